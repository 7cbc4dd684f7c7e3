"""Score units, allocate per-layer budgets, build the plan, slice: the pruning step as one call.

The planning pieces (:mod:`gqa_prune.planning`) are re-exported here, the API's home.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gqa_prune.allocation import AllocationConfig
from gqa_prune.compensation import (
    DEFAULT_DAMP,
    DEFAULT_TARGET,
    DEFAULT_TARGET_NORM,
    Compensation,
    ResidentLayers,
    Selection,
    SensitivityWeights,
    Target,
    TargetNorm,
)
from gqa_prune.errors import GQAPruneError
from gqa_prune.importance import compute_unit_scores
from gqa_prune.planning import (
    PRUNING_MODES,
    PruneOutcome,
    PruningMode,
    build_plan,
    needs_unit_scores,
    plan_pruning,
    prune_walk_,
    select_channels_to_keep,
    select_gqa_groups_to_prune,
    zero_scores,
)
from gqa_prune.streaming import LayerStreamer, StreamingConfig, prune_model_streaming_

__all__ = [
    "PRUNING_MODES",
    "PruneOutcome",
    "PruningMode",
    "build_plan",
    "check_finite_logits",
    "needs_unit_scores",
    "plan_pruning",
    "prune_model_",
    "select_channels_to_keep",
    "select_gqa_groups_to_prune",
    "zero_scores",
]


def prune_model_(
    model: nn.Module,
    calibration_ids: torch.Tensor,
    allocation_config: AllocationConfig,
    layer_importance: Sequence[float] | None = None,
    criterion: str = "taylor",
    aggregation: str = "sum",
    mode: PruningMode = "layer",
    batch_size: int = 1,
    seed: int = 0,
    progress: bool = True,
    compensation: Compensation | str = "lstsq",
    compensation_ids: torch.Tensor | None = None,
    compensation_damp: float = DEFAULT_DAMP,
    streaming: LayerStreamer | StreamingConfig | None = None,
    selection: Selection | str = "score",
    compensation_target: Target | str = DEFAULT_TARGET,
    sensitivity_weights: SensitivityWeights | str = "stream",
    compensation_target_norm: TargetNorm | str = DEFAULT_TARGET_NORM,
) -> PruneOutcome:
    """Prune ``model`` in place to remove ``allocation_config.pruning_ratio`` of its parameters.

    Args:
        model: a supported causal LM.
        calibration_ids: ``(num_samples, seq_len)`` calibration tokens (non-test split).
        allocation_config: target, strategy and constraints of the per-layer allocation.
        layer_importance: one score per layer (higher = more important); None = all equal.
        criterion: unit importance criterion (see ``gqa_prune.importance.CRITERIA``).
        aggregation: how a unit's element scores combine (``sum``, ``mean``, ``max``).
        mode: ``layer`` = per-layer budgets from layer importance (``allocate``);
            ``global`` = cheapest units across all layers by score per parameter
            (``allocate_global``), with the same floors, frozen layers and range;
            ``sensitivity`` = the same global solve on the repair's measured error curves
            (``gqa_prune.compensation.sensitivity``, on ``calibration_ids``; no unit
            scores; no backward pass with the default ``sensitivity_weights``;
            ``criterion`` and ``layer_importance`` unused except for
            ``freeze_top_n_layers``).
        batch_size: calibration samples per forward/backward.
        seed: seed of the ``random`` criterion.
        compensation: ``none`` (plain deletion), ``lstsq`` or ``bias``: how the weights
            that stay are repaired, layer by layer (see ``gqa_prune.compensation``).
            ``lstsq`` is the default because it wins (SmolLM2-135M, 25% removed:
            wikitext-2 perplexity 164.2 with plain deletion, 124.4 with ``lstsq``, 148.8
            with ``bias``; ``bench/bench_compensation.py``).
        compensation_ids: ``(num_samples, seq_len)`` calibration tokens of the compensation;
            None = ``calibration_ids``.
        compensation_damp: ridge strength of ``lstsq`` (relative to the Gram diagonal).
        streaming: run every step with one decoder layer on the device at a time
            (``gqa_prune.streaming``; same plan and weights). A ``StreamingConfig``
            (device, ``max_memory``, ``offload_dir``) streams and then gathers the pruned
            model back into CPU RAM; a ``LayerStreamer`` (already holding ``model``) leaves
            it streamed. None = everything on the model's device.
        selection: ``score`` = keep each layer's highest-scoring units; ``repair`` = keep
            as many, chosen by the error the ``lstsq`` refit leaves (greedy structured OBS
            on the compensation's Gram matrices, ``gqa_prune.compensation.selection``).
            The returned ``plan`` is the one applied. In ``layer`` mode ``repair`` needs
            no unit scores (the allocation gives the counts), so none are computed: no
            backward pass at all.
        compensation_target: ``local`` = refit each projection to its own dense weights on
            the pruned inputs; ``dense`` = to the dense model's outputs (a dense stream
            carried beside the pruned one), so each layer also corrects the drift from below;
            a number ``beta`` in [0, 1] (as a string, ``"0.25"``) = the blend
            ``(1 - beta) local + beta dense``.
        compensation_target_norm: the size of each token's dense target: ``dense`` (as the
            dense model has it) or ``local`` (default: the pruned layer's own output's; the
            direction stays the dense model's). Used only when ``compensation_target`` is
            not ``local``.
        sensitivity_weights: token weights of the ``sensitivity`` mode's error curves:
            ``stream`` (the size of the residual stream) or ``gradient`` (the squared loss
            gradient at each layer's output: one more forward and a layer-wise backward).
    """
    step: dict[str, Any] = dict(
        batch_size=batch_size,
        progress=progress,
        compensation=compensation,
        compensation_ids=compensation_ids,
        compensation_damp=compensation_damp,
        selection=selection,
        compensation_target=compensation_target,
        compensation_target_norm=compensation_target_norm,
        sensitivity_weights=sensitivity_weights,
    )
    if streaming is not None:
        return _prune_streaming_(
            model,
            streaming,
            calibration_ids,
            allocation_config,
            layer_importance=layer_importance,
            criterion=criterion,
            aggregation=aggregation,
            mode=mode,
            seed=seed,
            **step,
        )
    was_training = model.training
    model.eval()  # no dropout in the calibration passes
    try:
        return prune_walk_(
            ResidentLayers(model),
            calibration_ids,
            allocation_config,
            layer_importance,
            mode,
            lambda: compute_unit_scores(
                model, calibration_ids, criterion, aggregation, batch_size, seed, progress
            ),
            lambda ids, when: check_finite_logits(model, ids, when),
            **step,
        )
    finally:
        model.train(was_training)


def _prune_streaming_(
    model: nn.Module,
    streaming: LayerStreamer | StreamingConfig,
    *args: Any,
    **kwargs: Any,
) -> PruneOutcome:
    if isinstance(streaming, StreamingConfig):
        streamer = LayerStreamer(model, streaming)
        try:
            outcome = prune_model_streaming_(streamer, *args, **kwargs)
            streamer.gather_("cpu")
        finally:
            streamer.close()
        return outcome
    if streaming.model is not model:
        raise GQAPruneError("the LayerStreamer passed as streaming= holds a different model")
    return prune_model_streaming_(streaming, *args, **kwargs)


@torch.no_grad()
def check_finite_logits(model: nn.Module, input_ids: torch.Tensor, step: str) -> None:
    """Raise a GQAPruneError naming ``step`` if the model's logits are not finite."""
    device = next(model.parameters()).device
    logits = model(input_ids=input_ids.to(device)).logits
    if not torch.isfinite(logits).all():
        raise GQAPruneError(f"{step}: the model produces non-finite logits")
