"""The tensor math of compensation: a ridge refit of kept input columns, and FLAP's bias.

A projection ``y = x W^T`` (``W``: out x in) loses the input features ``R`` and keeps ``S``.
On calibration inputs ``X`` (tokens x in) the dense output is ``X W^T``; after deletion it is
``X_S W_S^T``, missing ``X_R W_R^T``. The kept columns absorb what they can of it::

    W'_S = argmin_V  || X W^T - X_S V^T ||^2 + lam || V - W_S ||^2
         = W_S + Delta,   Delta^T = (G_SS + lam I)^-1 G_SR W_R^T,   G = X^T X

(the least-squares reconstruction of SlimGPT/ZipLM-style pruners, written as a correction of
the kept weights). The ridge term pulls towards the *original* weights, not towards zero: a
large ``lam`` falls back to plain deletion instead of shrinking ``W_S``, and with nothing
removed the weights are returned unchanged. Since ``Delta = 0`` is a candidate, the error on
the calibration inputs is never larger than that of plain deletion.

**Dense targets** (error correction): the inputs ``X`` reaching a layer of the pruned model
differ from the dense model's ``X_d`` (the layers below were pruned). Refitting to the dense
model's own output ``Y = X_d W^T`` instead of ``X W^T`` also corrects that drift::

    W'_S = argmin_V  || Y - X_S V^T ||^2 + lam || V - W_S ||^2
         = W_S + Delta,   Delta^T = (G_SS + lam I)^-1 (C_S - G_SS W_S^T),   C = X^T Y

``C`` (in x out) is accumulated beside ``G`` from the dense model's projection outputs on the
same tokens (no ``in x in`` cross-Gram is needed). With ``Y = X W^T`` (``C = G W^T``) this is
the formula above. Extra cost: ``C`` is ``2 N in out`` flops and ``in x out`` fp32, less
than the Gram matrix for ``down_proj`` (out = hidden < in), plus one pass of the dense layer.

**Blended targets**: ``Y_b = (1 - b) X W^T + b Y`` for a share ``b`` in [0, 1] of the dense
outputs. Since ``||Y_b - X_S V^T||^2`` and ``(1 - b) ||X W^T - X_S V^T||^2 + b ||Y - X_S V^T||^2``
differ by a constant in ``V``, this refit minimises the blend of the two objectives; it
needs only the blended cross product::

    C_b = (1 - b) G W^T + b C

and then runs as above (``b = 0``: the local target, ``b = 1``: the dense one). The refit is
linear in ``C``, so on fixed kept columns ``W'_S(b) = (1 - b) W'_S(0) + b W'_S(1)``. Extra
cost: one ``in x in x out`` product, ``2 in^2 out`` flops (Llama-3-8B ``down_proj``:
1.7 TFLOP, as much as its Gram matrix).

**Target norm**: with ``--compensation_target_norm local`` each token's dense target keeps
its direction but takes the size of the layer's own output on the pruned inputs::

    Y'_t = Y_t ||x_t W^T|| / ||Y_t||        (per token t; C = X^T Y')

so the refit corrects *where* the drifted output points, not how large it is (after a
post-norm, as in Gemma's blocks, only the direction reaches the residual stream; in a
pre-norm block the size is what the residual carries). Extra cost: ``x W^T`` per token,
``2 N in out`` flops, as much as ``C`` itself; done while ``C`` accumulates
(:class:`~gqa_prune.compensation.stats.InputStats`). The blend then uses ``C = X^T Y'``.

FLAP (An et al. 2024) instead adds the removed features' mean contribution as an output bias:
``b += W_R mean(X_R)``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from gqa_prune.errors import GQAPruneError

log = logging.getLogger(__name__)


def split_features(
    keep: Sequence[int] | torch.Tensor, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kept, removed)`` feature indices (long tensors, ascending) of ``size`` features."""
    kept = torch.as_tensor(keep, dtype=torch.long).sort().values
    mask = torch.ones(size, dtype=torch.bool)
    mask[kept] = False
    return kept, mask.nonzero().flatten()


def ridge_refit(
    weight: torch.Tensor,
    gram: torch.Tensor,
    keep: Sequence[int] | torch.Tensor,
    damp: float,
    cross: torch.Tensor | None = None,
) -> torch.Tensor:
    """Kept input columns of ``weight``, refitted to reproduce the dense output.

    Args:
        weight: ``(out, in)`` weight of the projection, before slicing.
        gram: ``(in, in)`` ``X^T X`` of its calibration inputs (any float dtype).
        keep: indices of the kept input features.
        damp: ridge strength relative to the kept inputs' energy,
            ``lam = damp * mean(diag(G_SS))``; must be > 0.
        cross: ``(in, out)`` ``X^T Y`` with ``Y`` the dense model's outputs of this
            projection on the same tokens (dense targets); None = ``Y = X W^T``.

    Returns:
        ``(out, len(keep))`` new weights of the kept columns, in ``weight``'s dtype. The
        solve runs in float64 (Cholesky; least squares if that fails).
    """
    if not damp > 0:
        raise GQAPruneError(f"compensation damp must be > 0, got {damp}")
    n_in = weight.shape[1]
    if gram.shape != (n_in, n_in):
        raise GQAPruneError(
            f"Gram matrix of shape {tuple(gram.shape)} does not fit weight {tuple(weight.shape)}"
        )
    if cross is not None and cross.shape != (n_in, weight.shape[0]):
        raise GQAPruneError(
            f"cross product of shape {tuple(cross.shape)} does not fit weight {tuple(weight.shape)}"
        )
    kept, removed = split_features(keep, n_in)
    kept, removed = kept.to(weight.device), removed.to(weight.device)
    w_kept = weight.index_select(1, kept)
    if removed.numel() == 0 and cross is None:
        return w_kept.clone()
    # gather the blocks directly (no |S| x in intermediate); fp64 from here on
    g_ss = gram[kept[:, None], kept].double()
    lam = damp * g_ss.diagonal().mean()
    if not lam > 0:  # kept inputs never active on the calibration data: nothing to fit
        return w_kept.clone()
    if cross is None:  # G_SR W_R^T
        g_sr = gram[kept[:, None], removed].double()
        rhs = g_sr @ weight.index_select(1, removed).double().T  # (|S|, out)
        del g_sr
    else:  # C_S - G_SS W_S^T
        rhs = cross.index_select(0, kept).double() - g_ss @ w_kept.double().T
    g_ss.diagonal().add_(lam)
    info = torch.empty((), dtype=torch.int32, device=g_ss.device)
    torch.linalg.cholesky_ex(g_ss, out=(g_ss, info))  # in place: one |S|^2 fp64 block
    if int(info) == 0:
        delta_t = torch.cholesky_solve(rhs, g_ss)
    else:
        log.warning("ridge refit: Cholesky failed (info %d); using least squares", int(info))
        g_ss = gram[kept[:, None], kept].double()
        g_ss.diagonal().add_(lam)
        delta_t = torch.linalg.lstsq(g_ss.cpu(), rhs.cpu()).solution.to(rhs.device)
    del g_ss, rhs
    delta_t = delta_t.T.add_(w_kept)  # (out, |S|): W_S + Delta
    return delta_t.to(weight.dtype)


def blend_cross(
    cross: torch.Tensor, gram: torch.Tensor, weight: torch.Tensor, share: float
) -> torch.Tensor:
    """``C_b = (1 - b) G W^T + b C``: the cross product of the blended target (``b = share``).

    Args:
        cross: ``(in, out)`` ``X^T Y`` against the dense model's outputs.
        gram: ``(in, in)`` ``X^T X`` of the same inputs.
        weight: ``(out, in)`` weight of the projection, before slicing.
        share: the dense outputs' share ``b`` in [0, 1].

    Returns:
        ``(in, out)`` in ``cross``'s dtype (at least float32), on ``cross``'s device.
    """
    if not 0.0 <= share <= 1.0:
        raise GQAPruneError(f"target share must be in [0, 1], got {share}")
    dtype = torch.promote_types(torch.promote_types(gram.dtype, cross.dtype), torch.float32)
    local = gram.to(dtype) @ weight.to(gram.device, dtype).T  # G W^T
    blended = local.mul_(1.0 - share).add_(cross.to(local.device, dtype), alpha=share)
    return blended.to(cross.device, torch.promote_types(cross.dtype, torch.float32))


def rescale_rows(target: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``Y'_t = Y_t ||R_t|| / ||Y_t||``: each row of ``target`` rescaled to the norm of the
    same row of ``reference`` (a zero row stays zero).

    Args:
        target: ``(T, out)`` dense outputs ``Y``.
        reference: ``(T, out)`` the layer's own outputs ``X W^T`` on the same tokens.

    Returns:
        ``(T, out)`` in ``target``'s dtype.
    """
    if target.shape != reference.shape:
        raise GQAPruneError(
            f"targets {tuple(target.shape)} and reference {tuple(reference.shape)} differ"
        )
    size = target.norm(dim=-1, keepdim=True)
    scale = reference.norm(dim=-1, keepdim=True).to(size.dtype) / size.clamp_min(1e-30)
    return target * torch.where(size > 0, scale, torch.zeros_like(scale))


def removed_mean_contribution(
    weight: torch.Tensor, input_mean: torch.Tensor, keep: Sequence[int] | torch.Tensor
) -> torch.Tensor:
    """FLAP's bias: ``W_R mean(X_R)``, shape ``(out,)``, in ``weight``'s dtype.

    Args:
        weight: ``(out, in)`` weight of the projection, before slicing.
        input_mean: ``(in,)`` mean calibration input of the projection.
        keep: indices of the kept input features.
    """
    _, removed = split_features(keep, weight.shape[1])
    removed = removed.to(weight.device)
    w_r = weight.index_select(1, removed).double()
    return (w_r @ input_mean.to(weight.device).double().index_select(0, removed)).to(weight.dtype)
