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

from gqa_prune.analysis.layer_backward import layerwise_backward
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
    totals: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> summed over batches

    def projection_params(layer: nn.Module) -> list[nn.Parameter]:
        return [
            p for proj in streamer.adapter.prunable_projections(layer) for p in proj.parameters()
        ]

    def add_scores(
        i: int, layer: nn.Module, params: list[nn.Parameter], grads: list[torch.Tensor]
    ) -> None:
        by_param = {id(p): g for p, g in zip(params, grads, strict=True)}
        scores = _layer_scores(streamer, layer, _with_grads(element, by_param), aggregation)
        if i in totals:
            totals[i][0].add_(scores[0])
            totals[i][1].add_(scores[1])
        else:
            totals[i] = scores

    # the loss exactly as model(ids, labels=ids), backpropagated one layer at a time
    layerwise_backward(
        streamer,
        list(input_ids.split(batch_size)),
        streamer.loss,
        params=projection_params,
        at_params=add_scores,
        what=f"{name} importance",
        progress=progress,
    )
    layers = range(streamer.num_layers)
    return UnitScores(
        groups=[totals[i][0] for i in layers], channels=[totals[i][1] for i in layers]
    )


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
