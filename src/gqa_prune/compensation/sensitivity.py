"""Measured sensitivity: per-layer error curves of the repair, for a global allocation.

For every decoder layer ``l`` of the *dense* model, one pass over the calibration set records
the Gram matrices of ``o_proj``'s and ``down_proj``'s inputs, each token weighted by the size
of the residual stream entering the layer, ``w_t = 1 / mean_j(h_tj^2)``::

    G_w = sum_t w_t x_t x_t^T

The greedy repair-aware removal of :mod:`.selection` then runs to the end on each projection
with ``G_w``: its ``k``-th removal raises the (weighted) refit error (1) by ``dE_k`` (eq. (2)
there), so ``E(k) = dE_1 + ... + dE_k`` is the error the ridge refit leaves with ``k`` units
gone -- for every ``k`` at once. A unit's cost is the error it adds to the residual stream,
each token's relative to that token's stream, averaged over the ``T`` tokens::

    c_k = g_p * max(dE_1, ..., dE_k) / T                                              (5)

Pre-norm layers read the stream through an RMSNorm, so an error matters relative to the
stream's size; the per-token weights keep the few tokens with massive activations (the
first token, in most models) from setting the scale of a whole layer. ``g_p`` is the
projection's gain into the layer output: for Llama-style blocks the output of ``o_proj`` /
``down_proj`` is added to the stream as it is (``g ~ 1``); sandwich norms (Gemma) rescale
it, so ``g_p = ||dh_out||^2 / ||dY_p||^2`` is measured on the first batch by adding a small
random perturbation ``dY_p`` (``EPS`` of the output's RMS, fixed seed) to the projection's
output and running the layer again. The running maximum makes every layer's curve convex,
so the units of a layer are priced in the greedy's own order.

Gradient weights (``weights="gradient"``, ``--sensitivity_weights gradient``). The stream
weights price an error by what the *next* norm sees; whether the layers above amplify or damp
it is left out. With ``g_t = dL/dh_t``, the gradient of the calibration loss ``L`` (summed
next-token NLL of the batch) at the layer's output, an error ``d_t`` added to the stream moves
the loss by ``~ g_t . d_t``; for an error direction unrelated to ``g_t``,
``E[(g_t . d_t)^2] = ||g_t||^2 ||d_t||^2 / H``, so the weights::

    w_t = ||dL/dh_t||^2                                                              (6)

make ``E(k)`` in (5) the predicted loss increase (the empirical-Fisher approximation), counted
through every layer above. ``g`` comes from one forward and one layer-wise backward over the
calibration set (:func:`output_gradient_weights` over
:func:`gqa_prune.analysis.layer_backward.layerwise_backward`, the same routine as the streamed
Taylor scores: the layers' inputs are kept on the host and each layer runs again with grad, so
in memory and streamed it is the same code): one forward more than a model backward, host
memory for the inputs of every layer, ``num_layers x N x L x H`` (Llama-3-8B, 32 x 128
tokens, bf16: 1 GiB).

:func:`gqa_prune.allocation.allocate_global` then removes the cheapest units per parameter
across all layers until the target is met (to within one MLP channel): the allocation with the
least predicted loss under (5) (greedy knapsack; exact when the curves are convex). The
per-layer counts go to the layer-wise engine, whose ``repair`` selection chooses the units
again on the pruned stream (with the plain Gram matrices of the refit).

Cost (stream weights): one pass of each dense layer over the calibration set (both Gram
matrices in one pass) plus two passes on one batch for the gains; per projection the greedy
run to the end, ``~ n^3 + 2 n (n^2 + o n)`` (``n`` inputs, ``o`` outputs): Llama-3-8B ``down_proj``
(n = 14336, o = 4096) ~ 12 TFLOP fp64 per layer, memory as for ``--selection repair``
(``H^-1`` 1.6 GiB + ``W'`` 0.47 GiB fp64).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from gqa_prune.analysis.decoder_stack import LayerCall, OutputHead
from gqa_prune.analysis.layer_backward import layerwise_backward
from gqa_prune.compensation.selection import greedy_removal
from gqa_prune.compensation.sequential import LayerWalk, check_calibration_ids
from gqa_prune.compensation.stats import InputStats
from gqa_prune.errors import GQAPruneError
from gqa_prune.importance import UnitScores

log = logging.getLogger(__name__)

# relative size of the random output perturbation that measures a projection's gain
EPS = 0.05

SensitivityWeights = Literal["stream", "gradient"]
# token weights of the error curves: 1 / mean square of the stream (default), or (6)
SENSITIVITY_WEIGHTS: tuple[str, ...] = ("stream", "gradient")


def check_sensitivity_weights(weights: str) -> None:
    """Raises GQAPruneError for a name not in :data:`SENSITIVITY_WEIGHTS`."""
    if weights not in SENSITIVITY_WEIGHTS:
        raise GQAPruneError(
            f"unknown sensitivity weights '{weights}'; choose one of "
            f"{', '.join(SENSITIVITY_WEIGHTS)}"
        )


def _token_weights(hidden: torch.Tensor) -> torch.Tensor:
    """``1 / mean_j(h_tj^2)`` per token, ``(B, L)`` fp32 (0 where the state is all zero)."""
    ms = hidden.detach().float().square().mean(-1)
    return torch.where(ms > 0, 1.0 / ms.clamp_min(torch.finfo(torch.float32).tiny), 0.0)


def _square_norms(grad: torch.Tensor) -> torch.Tensor:
    """``||g_t||^2`` per token: (B, L, H) -> (B, L) fp32."""
    return grad.detach().float().square().sum(-1)


def output_gradient_weights(
    walk: LayerWalk, batches: Sequence[torch.Tensor], progress: bool = False
) -> list[list[torch.Tensor]]:
    """(6): ``||dL_b/dh_t||^2`` at every layer's output, per batch ``b`` and token ``t``.

    ``L_b`` is the summed next-token NLL of batch ``b`` (the model's final norm, LM head and
    logit soft-cap). Forward over all layers keeping each layer's input (host), the loss
    gradient at the last output, then layer by layer from the top: run the layer again with
    grad on its kept input and backpropagate to that input (the previous layer's output).
    Weights are not differentiated (their ``requires_grad`` is off meanwhile) and the model
    is left unchanged.

    Returns:
        ``[layer][batch]`` fp32 ``(B, L)`` tensors on the host.

    Raises:
        GQAPruneError: the calibration loss is not finite.
    """
    head = OutputHead(walk.model)

    def summed_nll(hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        logits = head(hidden[:, :-1]).float()
        targets = ids[:, 1:].to(logits.device).reshape(-1)
        return nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets, reduction="sum"
        )

    weights: list[list[torch.Tensor]] = [[] for _ in range(walk.num_layers)]

    def keep(i: int, grads: list[torch.Tensor]) -> None:
        weights[i] = [_square_norms(g) for g in grads]  # grads rest on the host

    layerwise_backward(
        walk,
        batches,
        summed_nll,
        at_output=keep,
        what="sensitivity gradient weights",
        progress=progress,
    )
    return weights


def curve_costs(increments: Sequence[float], order: Sequence[int], scale: float) -> torch.Tensor:
    """(5) for one projection: unit costs from the greedy's increments, in unit order.

    Args:
        increments: ``dE_k`` of the ``k``-th removed unit (greedy order).
        order: the unit removed at step ``k``; every unit exactly once.
        scale: ``g_p / T``.

    Returns:
        ``(n_units,)`` float64 costs, strictly increasing along ``order`` (the running
        maximum, nudged up by one ulp where it stalls), so that sorting them gives back the
        greedy's order.
    """
    inc = np.maximum(np.asarray(increments, dtype=np.float64), 0.0) * max(scale, 0.0)
    curve = np.maximum.accumulate(inc) if inc.size else inc
    for k in range(1, curve.size):
        if curve[k] <= curve[k - 1]:
            curve[k] = np.nextafter(curve[k - 1], np.inf)
    costs = torch.empty(len(order), dtype=torch.float64)
    costs[torch.as_tensor(list(order), dtype=torch.long)] = torch.from_numpy(curve)
    return costs


@torch.no_grad()
def _gain(
    walk: LayerWalk,
    layer: nn.Module,
    linear: nn.Linear,
    hidden: torch.Tensor,
    call: LayerCall,
    reference: torch.Tensor,
    seed: int,
) -> float:
    """``||dh_out||^2 / ||dY||^2``, ``dY`` random, ``EPS`` x RMS, added to ``linear``'s output."""
    generator = torch.Generator().manual_seed(seed)
    added: list[torch.Tensor] = []

    def perturb(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(out.shape, generator=generator, dtype=torch.float32)
        rms = out.detach().float().square().mean().sqrt()
        delta = (noise.to(out.device) * (EPS * rms)).to(out.dtype)
        added.append(delta.float())
        return out + delta

    handle = linear.register_forward_hook(perturb)
    try:
        moved = walk.run(layer, hidden, call).float()
    finally:
        handle.remove()
    size = sum(float(d.square().sum()) for d in added)
    return float((moved - reference).square().sum()) / size if size > 0 else 1.0


@torch.no_grad()
def repair_sensitivity(
    walk: LayerWalk,
    calibration_ids: torch.Tensor,
    damp: float,
    batch_size: int = 8,
    progress: bool = False,
    weights: SensitivityWeights | str = "stream",
) -> UnitScores:
    """Unit costs (5) of every layer from the dense model's statistics (see the module doc).

    Args:
        walk: the dense model's layers (in memory or streamed); left unchanged.
        calibration_ids: ``(num_samples, seq_len)`` calibration tokens, no padding.
        damp: the ridge strength of the refit (as ``--compensation_damp``).
        batch_size: calibration sequences per layer forward.
        progress: show a progress bar over layers.
        weights: token weights of the Gram matrices: ``stream`` = ``1 / mean(h_t^2)`` of
            the stream entering the layer; ``gradient`` = (6), from one more forward and
            a layer-wise backward (:func:`output_gradient_weights`).

    Returns:
        :class:`UnitScores` of float64 costs (higher = more important): per layer one per
        KV group (empty where the attention block was removed) and one per MLP channel;
        within a layer they increase along the greedy's removal order.
    """
    ids = check_calibration_ids("sensitivity", calibration_ids, batch_size)
    check_sensitivity_weights(weights)
    adapter = walk.adapter
    batches = list(ids.split(batch_size))
    gradient = output_gradient_weights(walk, batches, progress) if weights == "gradient" else None
    states, calls = walk.capture(batches)
    geometry = adapter.geometry(walk.model)
    width = geometry.queries_per_kv * geometry.head_dim
    groups: list[torch.Tensor] = []
    channels: list[torch.Tensor] = []
    for i in tqdm(range(walk.num_layers), desc="sensitivity", disable=not progress):
        with walk.layer(i) as layer:
            layer_calls = [c.of(i) for c in calls]
            down = adapter.mlp_projections(layer)[2]
            linears = [down]
            if adapter.has_attention(layer):
                linears.insert(0, adapter.attention_projections(layer)[3])
            # per-token weights 1 / mean(h_t^2): each token's error relative to its stream;
            # or (6), the squared loss gradient at the layer's output
            if gradient is None:
                token_weights = [_token_weights(h) for h in states]
            else:
                token_weights, gradient[i] = gradient[i], []
            stats = [InputStats(lin, True, weights=token_weights) for lin in linears]
            first_in = states[0]  # batch 0's input and dense output, for the gains
            tokens = sum(w.numel() for w in token_weights)
            reference = torch.empty(0)
            try:
                for b, call in enumerate(layer_calls):
                    out = walk.run(layer, states[b], call)
                    if b == 0:
                        reference = out.float()
                    states[b] = out.to(walk.host)
            finally:
                for s in stats:
                    s.remove()
            del token_weights
            costs = []
            for j, (lin, st) in enumerate(zip(linears, stats, strict=True)):
                width_p = 1 if lin is down else width
                gain = _gain(walk, layer, lin, first_in, layer_calls[0], reference, 2 * i + j)
                gram, st.gram = st.gram, None  # freed after the greedy
                assert gram is not None  # InputStats(gram=True)
                trace = greedy_removal(lin.weight, gram, lin.in_features // width_p, damp, width_p)
                del gram
                scale = gain / tokens
                costs.append(curve_costs(trace.increments, trace.removed, scale))
                log.debug("layer %d: gain %.3g, E(all) %.3g", i, gain, trace.error * scale)
            del first_in, reference
            if len(costs) == 1:
                costs.insert(0, torch.zeros(0, dtype=torch.float64))
            groups.append(costs[0])
            channels.append(costs[1])
    return UnitScores(groups, channels)
