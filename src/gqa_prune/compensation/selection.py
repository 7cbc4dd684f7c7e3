"""Repair-aware selection: remove the units whose loss the ridge refit absorbs best.

A projection ``y = x W^T`` (``W``: out x in, inputs ``X``: tokens x in, ``G = X^T X``) keeps
the input features ``S`` and loses ``R``; :func:`gqa_prune.compensation.solve.ridge_refit`
then solves ``min_V ||X W^T - X_S V^T||^2 + lam ||V - W_S||^2``. With ``Delta = V - W_S`` the
objective is ``||X_R W_R^T - X_S Delta^T||^2 + lam ||Delta||^2``, whose minimum is (per
output row, summed; ``H = G + lam I``, Schur complement of ``H_SS`` in ``H``)::

    E(R) = tr(W_R [G_RR - G_RS (G_SS + lam I)^-1 G_SR] W_R^T)
         = tr(W_R [(H^-1)_RR]^-1 W_R^T) - lam ||W_R||_F^2                       (1)

i.e. the structured optimal-brain-surgeon error with the damped Hessian ``H``, minus the
ridge term of the removed columns: exactly the objective ``ridge_refit`` minimises (the
calibration residual plus ``lam ||V - W_S||^2``). The first term of (1) is plain least
squares with Gram ``H`` (rows ``[X; sqrt(lam) I]``), so removals compose like OBS: with
``W'`` the refitted weights (zero on removed columns) and ``H^-1`` restricted to the kept
set, removing a further block ``C`` costs::

    E(R + C) - E(R) = tr(W'_C [(H^-1)_CC]^-1 W'_C^T) - lam ||W_C||_F^2              (2)
    W'       <- W' - W'_C [(H^-1)_CC]^-1 (H^-1)_C,:                                 (3)
    H^-1     <- H^-1 - (H^-1)_:,C [(H^-1)_CC]^-1 (H^-1)_C,:                         (4)

(``W_C`` = the *original* columns: the ridge pulls towards them). (4) is the rank-|C|
downdate that turns ``(H^-1)`` into ``(H_SS)^-1`` on the kept set (rows/columns ``C``
become zero). Greedy removal: score every remaining unit by (2), remove the cheapest,
update by (3)-(4), repeat. A unit is a block of ``width`` consecutive columns (one GQA group
of ``o_proj`` = its ``r * head_dim`` query-head columns; one MLP channel of ``down_proj`` =
one column). Greedy is not guaranteed optimal (the removal problem is a subset selection);
it is exact for one unit and whenever ``G`` is block-diagonal over the units.

``lam = damp * mean(diag(G))`` over *all* inputs, fixed during the selection, and the
refitted ``W'`` left by (3) *is* the ridge refit of the chosen kept set with that ``lam``
(``W_S + Delta`` of :mod:`.solve`): it is written as the compensation, with no second solve.
(``ridge_refit`` alone uses ``mean(diag(G_SS))`` of the kept set, a few percent apart; on
tiny layers that shift can reorder close candidates, so the two are not mixed.)

Dense targets (``C = X^T Y``, :mod:`.solve`): with ``F(U) = ||Y - X U^T||^2 + lam ||U - W||^2``
minimised over all columns by ``W*^T = H^-1 (C + lam W^T)``, ``F(U) = F(W*) + tr((U - W*) H
(U - W*)^T)``, so the objective with ``R`` removed is ``F(W*) + tr(W*_R [(H^-1)_RR]^-1
W*_R^T) - lam ||W_R||^2``: (1)-(4) hold with ``W'`` starting at ``W*`` instead of ``W`` (the
constant ``F(W*)`` does not depend on ``R`` and is left out of the reported error).

Cost, ``n`` inputs, ``o`` outputs, ``k`` units removed in chunks of ``c`` (fp64):
inverse ``H^-1`` ~ ``n^3`` (Cholesky + inverse), per chunk the scores ``O(o n)`` (width 1)
or ``O(U (b^3 + b^2 o))`` (``U`` groups of width ``b``), updates ``2 n^2 c + 2 o n c``;
in all ``~ n^3 + 2 k (n^2 + o n)``. Chunks of ``c = ceil(n_units / 128)`` units (the ``c``
cheapest by (2), then one block update) keep the updates matrix-matrix products.
Llama-3-8B ``down_proj`` (n = 14336, o = 4096), 25% removed (k = 3584, c = 112, 32 chunks):
inverse ~ 3.9 TFLOP + updates ~ 1.9 TFLOP, i.e. ~2 n^3, about the ridge solve's 1.4 TFLOP
times four; memory ``n^2`` fp64 for ``H^-1`` (1.6 GiB) + ``o n`` fp64 for ``W'`` (0.47 GiB)
+ a transient ``n^2`` fp64 during the inversion. ``o_proj`` (n = 4096, 8 groups of 512) is
small: inverse 0.09 TFLOP, each step 8 solves of 512 x 512 with 4096 right-hand sides.
Measured on one shared CPU core (random correlated layer, 25% removed, out 1024): n = 2048
2.5 s vs 0.9 s for one ``ridge_refit`` of the kept set (2.9x), n = 4096 16 s vs 3.6 s
(4.5x). The refit written is ``W'`` itself, so ``ridge_refit``'s solve is saved: the added
time is the difference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from gqa_prune.errors import GQAPruneError

Selection = Literal["score", "repair"]
SELECTIONS: tuple[str, ...] = ("score", "repair")
# chunks per selection: ceil(n_units / CHUNKS) units are removed per update (see above)
CHUNKS = 128


def check_selection(selection: str, compensation: str) -> None:
    """Raise a GQAPruneError for an unknown selection, or ``repair`` without ``lstsq``."""
    if selection not in SELECTIONS:
        raise GQAPruneError(
            f"unknown selection '{selection}'; choose one of {', '.join(SELECTIONS)}"
        )
    if selection == "repair" and compensation != "lstsq":
        raise GQAPruneError(
            f"--selection repair chooses units by the lstsq refit's error; it needs "
            f"--compensation lstsq (got '{compensation}')"
        )


def unit_columns(units: torch.Tensor | Sequence[int], width: int) -> torch.Tensor:
    """Column indices of the listed units when each unit spans ``width`` consecutive columns."""
    u = torch.as_tensor(units, dtype=torch.long).reshape(-1)
    return (u[:, None] * width + torch.arange(width, device=u.device)[None, :]).reshape(-1)


def ridge_lambda(gram: torch.Tensor, damp: float) -> float:
    """``damp * mean(diag(G))``: the selection's ridge strength."""
    return float(damp * gram.diagonal().double().mean())


def removal_error(
    weight: torch.Tensor,
    gram: torch.Tensor,
    removed: Sequence[int] | torch.Tensor,
    lam: float,
    cross: torch.Tensor | None = None,
) -> float:
    """Closed form (1): the refit objective after removing input columns ``removed``.

    Args:
        weight: ``(out, in)`` weight of the projection.
        gram: ``(in, in)`` ``X^T X`` of its calibration inputs.
        removed: removed input columns.
        lam: ridge strength (> 0).
        cross: ``(in, out)`` ``X^T Y`` for dense targets ``Y``; None = ``Y = X W^T``.

    Returns:
        ``min_V ||Y - X_S V^T||^2 + lam ||V - W_S||^2 - F(W*)`` (0 when nothing is
        removed; ``F(W*) = 0`` when ``Y = X W^T``).
    """
    rem = torch.as_tensor(removed, dtype=torch.long).reshape(-1)
    if rem.numel() == 0:
        return 0.0
    hinv = damped_inverse(gram, lam)
    start = full_refit(weight, hinv, lam, cross)
    w_r = start[:, rem]
    quad = (w_r * torch.linalg.solve(hinv[rem[:, None], rem], w_r.T).T).sum()
    return float(quad - lam * weight.double()[:, rem].square().sum())


def full_refit(
    weight: torch.Tensor, hinv: torch.Tensor, lam: float, cross: torch.Tensor | None
) -> torch.Tensor:
    """``W*`` (float64, ``(out, in)``): all columns refitted to the targets; ``W`` if None."""
    if cross is None:
        return weight.double().clone()
    rhs = cross.to(hinv.device).double() + lam * weight.double().T  # (in, out)
    return (hinv @ rhs).T.contiguous()


def damped_inverse(gram: torch.Tensor, lam: float) -> torch.Tensor:
    """``(G + lam I)^-1`` in float64 (Cholesky; one transient ``in^2`` copy)."""
    h = gram.double()  # a copy when gram is fp32 (the compensation's Gram matrices are)
    if h is gram:
        h = h.clone()
    h.diagonal().add_(lam)
    info = torch.empty((), dtype=torch.int32, device=h.device)
    torch.linalg.cholesky_ex(h, out=(h, info))
    if int(info) != 0:
        raise GQAPruneError(
            "repair selection: the damped Gram matrix is not positive definite; raise "
            "--compensation_damp"
        )
    return torch.cholesky_inverse(h)


def downdate_inverse_(hinv: torch.Tensor, cols: torch.Tensor, *others: torch.Tensor) -> None:
    """Remove ``cols`` from an inverse in place: (4), and (3) for every ``others`` matrix.

    Args:
        hinv: ``(n, n)`` inverse of the damped Gram matrix restricted to the kept columns
            (zero rows/columns at removed ones); becomes the inverse over the kept columns
            minus ``cols``.
        cols: columns to remove.
        others: ``(o, n)`` refitted weights ``W'`` updated by (3) (zero at ``cols`` after).
    """
    hinv_c = hinv[:, cols]  # (n, |C|)
    block = hinv_c[cols]  # (|C|, |C|), symmetric positive definite
    step = torch.linalg.solve(block, hinv_c.T)  # [(H^-1)_CC]^-1 (H^-1)_C,:  (|C|, n)
    for w in others:
        w.addmm_(w[:, cols], step, alpha=-1)  # in place: no (o, n) temporary
        w[:, cols] = 0
    hinv.addmm_(hinv_c, step, alpha=-1)
    hinv[cols, :] = 0
    hinv[:, cols] = 0


def _unit_costs(
    refit: torch.Tensor, hinv: torch.Tensor, norms: torch.Tensor, width: int, lam: float
) -> torch.Tensor:
    """(2) for every unit, ``(n_units,)`` (removed units get garbage; the caller masks them)."""
    if width == 1:
        diag = hinv.diagonal().clamp_min(torch.finfo(hinv.dtype).tiny)
        return refit.square().sum(0) / diag - lam * norms
    n_units = hinv.shape[0] // width
    idx = unit_columns(torch.arange(n_units, device=hinv.device), width).view(n_units, width)
    blocks = hinv[idx[:, :, None], idx[:, None, :]]  # (U, b, b)
    dead = blocks.diagonal(dim1=1, dim2=2).amax(1) <= 0  # removed: zero blocks
    blocks[dead] = torch.eye(width, dtype=blocks.dtype, device=blocks.device)
    w_units = refit[:, idx].permute(1, 2, 0)  # (U, b, out)
    quad = (w_units * spd_block_solve(blocks, w_units)).sum((1, 2))
    return quad - lam * norms


def spd_block_solve(blocks: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``blocks[u]^-1 rhs[u]`` for a batch ``(U, b, b)`` of symmetric positive definite blocks.

    Cholesky (``b^3 / 3`` per block, half of LU's). Batched LU is also unsafe here: on
    multi-threaded CPU builds (torch 2.13, MKL) it fails for blocks from ~130 wide ("Pivots
    given to lu_solve must all be greater or equal to 1"), e.g. SmolLM2's 192-wide GQA groups.
    A block that is not numerically positive definite is solved alone by LU.
    """
    chol, info = torch.linalg.cholesky_ex(blocks)
    out = torch.cholesky_solve(rhs, chol)
    for u in torch.nonzero(info).flatten().tolist():
        out[u] = torch.linalg.solve(blocks[u], rhs[u])
    return out


@dataclass(frozen=True)
class GreedyRemoval:
    """What :func:`greedy_removal` chose.

    Attributes:
        removed: unit indices in the order they were removed.
        error: ``E(removed)`` of (1), accumulated from (2) (exact for any chunking).
        refit: ``(out, in)`` float64 ``W'``: the ridge refit of the kept columns (the
            argmin of (1)), zero on removed columns.
        increments: per removed unit (same order), the rise of (1) it caused: (2) for a
            single unit, a chunk's rise shared equally by its units. Their running sum is
            the error curve ``E(k)``; ``sum(increments) == error``.
    """

    removed: tuple[int, ...]
    error: float
    refit: torch.Tensor
    increments: tuple[float, ...] = ()


def greedy_removal(
    weight: torch.Tensor,
    gram: torch.Tensor,
    n_remove: int,
    damp: float,
    width: int = 1,
    chunk: int | None = None,
    cross: torch.Tensor | None = None,
) -> GreedyRemoval:
    """Remove ``n_remove`` units greedily by (2), with the downdates (3)-(4).

    Args:
        weight: ``(out, in)`` weight of the projection (``in`` a multiple of ``width``).
        gram: ``(in, in)`` ``X^T X`` of its calibration inputs.
        n_remove: units to remove.
        damp: ridge strength relative to the mean Gram diagonal (> 0).
        width: columns per unit.
        chunk: units removed per update; None = ``ceil(n_units / CHUNKS)``, 1 = plain greedy.
        cross: ``(in, out)`` ``X^T Y`` for dense targets ``Y`` (see the module docstring);
            None = the projection's own output ``X W^T``.

    Ties break towards the lower unit index, so the result is deterministic.
    """
    weight = weight.detach()
    n_in = weight.shape[1]
    if width < 1 or n_in % width or gram.shape != (n_in, n_in):
        raise GQAPruneError(
            f"repair selection: weight {tuple(weight.shape)}, Gram {tuple(gram.shape)} and "
            f"unit width {width} do not fit"
        )
    n_units = n_in // width
    if not 0 <= n_remove <= n_units:
        raise GQAPruneError(f"cannot remove {n_remove} of {n_units} units")
    if cross is not None and cross.shape != (n_in, weight.shape[0]):
        raise GQAPruneError(
            f"repair selection: cross product {tuple(cross.shape)} does not fit weight "
            f"{tuple(weight.shape)}"
        )
    lam = ridge_lambda(gram, damp)
    if (n_remove == 0 and cross is None) or not lam > 0:  # nothing to fit, or no inputs
        refit = weight.double().clone()
        gone = tuple(range(n_units - n_remove, n_units))
        refit[:, unit_columns(gone, width).to(refit.device)] = 0
        return GreedyRemoval(gone, 0.0, refit, (0.0,) * len(gone))
    chunk = chunk or math.ceil(n_units / CHUNKS)
    device = weight.device
    hinv = damped_inverse(gram.to(device), lam)
    refit = full_refit(weight, hinv, lam, cross)  # W': refitted, zero on removed columns
    if n_remove == 0:
        return GreedyRemoval((), 0.0, refit)
    col_norms = weight.double().square().sum(0)
    norms = col_norms.view(n_units, width).sum(1)  # ||W_u||^2 of the original columns
    alive = torch.ones(n_units, dtype=torch.bool, device=device)
    removed: list[int] = []
    increments: list[float] = []
    error = 0.0
    while len(removed) < n_remove:
        costs = _unit_costs(refit, hinv, norms, width, lam).masked_fill(~alive, math.inf)
        take = min(chunk, n_remove - len(removed))
        pick = torch.sort(costs, stable=True).indices[:take]
        cols = unit_columns(pick, width)
        if take == 1:
            rise = float(costs[pick[0]])
        else:  # (2) for the whole chunk
            w_c = refit[:, cols]
            quad = (w_c * torch.linalg.solve(hinv[cols[:, None], cols], w_c.T).T).sum()
            rise = float(quad - lam * norms[pick].sum())
        error += rise
        increments.extend([rise / take] * take)
        downdate_inverse_(hinv, cols, refit)
        alive[pick] = False
        removed.extend(int(i) for i in pick.tolist())
    del hinv
    return GreedyRemoval(tuple(removed), error, refit, tuple(increments))


def select_kept_units(
    weight: torch.Tensor,
    gram: torch.Tensor,
    n_keep: int,
    damp: float,
    width: int = 1,
    cross: torch.Tensor | None = None,
) -> tuple[tuple[int, ...], torch.Tensor]:
    """The ``n_keep`` units that stay after greedy repair-aware removal, and their refit.

    Args:
        weight: ``(out, in)`` weight of ``o_proj`` (units = GQA groups, ``width`` =
            queries per KV head x head_dim) or ``down_proj`` (units = channels, width 1).
        gram: ``(in, in)`` ``X^T X`` of its calibration inputs.
        n_keep: how many units the layer's budget keeps.
        damp: ridge strength relative to the mean Gram diagonal.
        width: columns per unit.
        cross: ``(in, out)`` ``X^T Y`` for dense targets; None = ``X W^T``.

    Returns:
        ``(kept, columns)``: kept unit indices (sorted) and the ``(out, n_keep * width)``
        refitted weights of their columns, in ``weight``'s dtype.
    """
    n_units = weight.shape[1] // max(width, 1)
    result = greedy_removal(weight, gram, n_units - n_keep, damp, width, cross=cross)
    gone = set(result.removed)
    kept = tuple(i for i in range(n_units) if i not in gone)
    cols = unit_columns(kept, width).to(result.refit.device)
    return kept, result.refit.index_select(1, cols).to(weight.dtype)
