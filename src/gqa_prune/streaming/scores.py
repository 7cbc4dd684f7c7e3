"""Unit importance with one decoder layer on the device at a time.

Every criterion gives the same scores as its in-memory version
(:func:`gqa_prune.importance.compute_unit_scores`), reduced by the same per-layer functions
(:func:`~gqa_prune.importance.compute_gqa_group_importance`,
:func:`~gqa_prune.importance.compute_mlp_channel_importance`) and summed over batches in
the same order, in fp32:

- ``taylor`` / ``taylor2``: the gradient of layer ``l``'s weights needs only the layer's
  input and the gradient arriving at its output. So, per calibration batch ``b``::

      forward  (layers 0..n-1, no grad):  x_b^l stored for every layer (host RAM)
      head     loss_b = model loss of x_b^n;  g_b^n = d loss_b / d x_b^n
      backward (layers n-1..0):  recompute y = layer_l(x_b^l) with grad, backward g_b^{l+1}
               -> dW (scores of layer l for batch b) and g_b^l = d loss_b / d x_b^l

  This is exactly the full-model backward, one layer at a time; it costs one extra
  forward of each layer (the recomputation) and holds ``num_layers x N x L x H`` boundary
  states on the host (N x L calibration tokens, H hidden size).
- ``wanda``: input norms of the layer's projections while the forward passes through it.
- ``magnitude``: the layer's weights; ``random``: shapes only (nothing is loaded).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from gqa_prune.errors import GQAPruneError
from gqa_prune.importance.base import (
    Aggregation,
    ElementScore,
    UnitScores,
    check_aggregation,
    compute_gqa_group_importance,
    compute_mlp_channel_importance,
)
from gqa_prune.importance.random import random_scores
from gqa_prune.importance.registry import get_criterion
from gqa_prune.importance.taylor import taylor_first_order, taylor_second_order
from gqa_prune.importance.wanda import InputNormCollector, wanda_element_scores
from gqa_prune.streaming.executor import LayerStreamer

# name -> scorer(streamer, input_ids, aggregation, batch_size, seed, progress) -> UnitScores
StreamingScorer = Callable[..., UnitScores]
STREAMING_SCORERS: dict[str, StreamingScorer] = {}


def _register(name: str) -> Callable[[StreamingScorer], StreamingScorer]:
    def wrap(fn: StreamingScorer) -> StreamingScorer:
        STREAMING_SCORERS[name] = fn
        return fn

    return wrap


def _layer_scores(
    streamer: LayerStreamer,
    layer: nn.Module,
    score_fn: ElementScore,
    aggregation: Aggregation,
) -> tuple[torch.Tensor, torch.Tensor]:
    adapter = streamer.adapter
    return (
        compute_gqa_group_importance(layer, score_fn, aggregation, adapter),
        compute_mlp_channel_importance(layer, score_fn, aggregation, adapter),
    )


def _with_grads(
    element: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    grads: dict[int, torch.Tensor],
) -> ElementScore:
    """Element score ``element(w, g)`` with ``g`` looked up by parameter identity."""

    def score_fn(param: torch.Tensor, kind: str) -> torch.Tensor:
        return element(param, grads[id(param)])

    return score_fn


def _wanda_scores(collector: InputNormCollector) -> ElementScore:
    """``|W_ij| * ||X_j||`` for weights, ``|b_i| * sqrt(N)`` for biases (as in ``wanda.py``)."""
    weight_norms = {id(p.weight): collector.norms(p) for p in collector.modules}
    bias_norms = {
        id(p.bias): math.sqrt(collector.tokens[p]) for p in collector.modules if p.bias is not None
    }

    def score_fn(param: torch.Tensor, kind: str) -> torch.Tensor:
        if kind == "bias":
            return param.detach().float().abs() * bias_norms[id(param)]
        return wanda_element_scores(param, weight_norms[id(param)])

    return score_fn


def streaming_unit_scores(
    streamer: LayerStreamer,
    input_ids: torch.Tensor | None,
    criterion: str = "taylor",
    aggregation: Aggregation | str = "sum",
    batch_size: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> UnitScores:
    """:func:`~gqa_prune.importance.compute_unit_scores`, one layer on the device at a time.

    Args and returns as there; ``streamer`` holds the model.

    Raises:
        GQAPruneError: unknown criterion or aggregation, missing calibration tokens for a
            data criterion, or non-finite scores.
    """
    spec = get_criterion(criterion)  # unknown names: the registry's error
    check_aggregation(aggregation)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise GQAPruneError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if spec.needs_data and (input_ids is None or input_ids.dim() != 2 or input_ids.numel() == 0):
        shape = None if input_ids is None else tuple(input_ids.shape)
        raise GQAPruneError(
            f"'{criterion}' importance needs calibration tokens of shape (num_samples, "
            f"seq_len), got {shape}"
        )
    if criterion not in STREAMING_SCORERS:
        raise GQAPruneError(f"criterion '{criterion}' has no streaming implementation")
    scores = STREAMING_SCORERS[criterion](
        streamer, input_ids, aggregation, batch_size, seed, progress
    )
    scores.check_finite(f"{criterion} importance (streaming)")
    return scores


def _taylor(
    streamer: LayerStreamer,
    input_ids: torch.Tensor,
    aggregation: Aggregation,
    batch_size: int,
    second_order: bool,
    progress: bool,
) -> UnitScores:
    name = "taylor2" if second_order else "taylor"
    element = taylor_second_order if second_order else taylor_first_order
    batches = list(input_ids.split(batch_size))
    states, calls = streamer.capture(batches)
    n = streamer.num_layers
    inputs: list[list[torch.Tensor]] = []
    # forward: keep every layer's input (host)
    with torch.no_grad():
        for i in tqdm(range(n), desc=f"{name} forward", disable=not progress):
            inputs.append(list(states))
            with streamer.layer(i) as layer:
                for b, call in enumerate(calls):
                    states[b] = streamer.run(layer, states[b], call).to(streamer.host)
    # head: d loss_b / d (last hidden states), the loss exactly as model(ids, labels=ids)
    grads: list[torch.Tensor] = []
    for b, ids in enumerate(batches):
        hidden = states[b].to(streamer.device).requires_grad_(True)
        with torch.enable_grad():
            loss = streamer.loss(hidden, ids)
            if not torch.isfinite(loss):
                raise GQAPruneError(
                    f"{name} importance: calibration loss is {loss.item()} at batch {b}; use "
                    "--dtype float32 or check the model weights"
                )
            (grad,) = torch.autograd.grad(loss, hidden)
        grads.append(grad.to(streamer.host))
    del states
    groups: list[torch.Tensor] = [torch.zeros(0)] * n
    channels: list[torch.Tensor] = [torch.zeros(0)] * n
    # backward: one layer at a time, from the top
    for i in tqdm(reversed(range(n)), total=n, desc=f"{name} backward", disable=not progress):
        with streamer.layer(i) as layer:
            params = [
                p
                for proj in streamer.adapter.prunable_projections(layer)
                for p in proj.parameters()
            ]
            flags = [p.requires_grad for p in params]
            for p in params:
                p.requires_grad_(True)
            try:
                total: tuple[torch.Tensor, torch.Tensor] | None = None
                for b, call in enumerate(calls):
                    x = inputs[i][b].to(streamer.device)
                    if i > 0:
                        x.requires_grad_(True)
                    with torch.enable_grad():
                        y = streamer.run(layer, x, call)
                        wrt = [*params, x] if i > 0 else params
                        got = torch.autograd.grad(y, wrt, grad_outputs=grads[b].to(y.device))
                    by_param = {id(p): g for p, g in zip(params, got, strict=False)}
                    score_fn = _with_grads(element, by_param)
                    g_scores, c_scores = _layer_scores(streamer, layer, score_fn, aggregation)
                    if total is None:
                        total = (g_scores, c_scores)
                    else:
                        total[0].add_(g_scores)
                        total[1].add_(c_scores)
                    grads[b] = got[-1].to(streamer.host) if i > 0 else grads[b]
                    del got, by_param, y
            finally:
                for p, flag in zip(params, flags, strict=True):
                    p.requires_grad_(flag)
        assert total is not None  # at least one batch
        groups[i], channels[i] = total
        inputs[i] = []
    return UnitScores(groups=groups, channels=channels)


@_register("taylor")
def _taylor_first(streamer, input_ids, aggregation, batch_size, seed, progress):  # type: ignore[no-untyped-def]
    return _taylor(streamer, input_ids, aggregation, batch_size, False, progress)


@_register("taylor2")
def _taylor_second(streamer, input_ids, aggregation, batch_size, seed, progress):  # type: ignore[no-untyped-def]
    return _taylor(streamer, input_ids, aggregation, batch_size, True, progress)


@_register("wanda")
def _wanda(
    streamer: LayerStreamer,
    input_ids: torch.Tensor,
    aggregation: Aggregation,
    batch_size: int,
    seed: int,
    progress: bool,
) -> UnitScores:
    """Wanda ``|W| * ||X||`` (see :mod:`gqa_prune.importance.wanda`), layer by layer."""
    states, calls = streamer.capture(list(input_ids.split(batch_size)))
    groups, channels = [], []
    with torch.no_grad():
        for i in tqdm(range(streamer.num_layers), desc="wanda", disable=not progress):
            with streamer.layer(i) as layer:
                projections = list(streamer.adapter.prunable_projections(layer))
                with InputNormCollector(projections) as collector:
                    for b, call in enumerate(calls):
                        states[b] = streamer.run(layer, states[b], call).to(streamer.host)
                g, c = _layer_scores(streamer, layer, _wanda_scores(collector), aggregation)
            groups.append(g)
            channels.append(c)
    return UnitScores(groups=groups, channels=channels)


@_register("magnitude")
def _magnitude(
    streamer: LayerStreamer,
    input_ids: torch.Tensor | None,
    aggregation: Aggregation,
    batch_size: int,
    seed: int,
    progress: bool,
) -> UnitScores:
    """L2 norms (see :mod:`gqa_prune.importance.magnitude`), layer by layer."""

    def squared(param: torch.Tensor, kind: str) -> torch.Tensor:
        return param.detach().float().pow(2)

    groups, channels = [], []
    with torch.no_grad():
        for i in tqdm(range(streamer.num_layers), desc="magnitude", disable=not progress):
            with streamer.layer(i) as layer:
                g, c = _layer_scores(streamer, layer, squared, aggregation)
            groups.append(g.sqrt())
            channels.append(c.sqrt())
    return UnitScores(groups=groups, channels=channels)


@_register("random")
def _random(
    streamer: LayerStreamer,
    input_ids: torch.Tensor | None,
    aggregation: Aggregation,
    batch_size: int,
    seed: int,
    progress: bool,
) -> UnitScores:
    """Seeded uniform scores: only the shapes are read, no layer is loaded."""
    return random_scores(
        streamer.model,
        None,
        aggregation=aggregation,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
