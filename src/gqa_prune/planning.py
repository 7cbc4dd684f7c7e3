"""The pruning step over any layer walk: allocate, choose the units (the plan), apply.

:func:`plan_pruning` allocates per-layer budgets and picks the units to keep, before any
weight changes; :func:`prune_walk_` runs the whole step (settings checked, plan, then the one
layer-wise engine :func:`gqa_prune.compensation.prune_layerwise_`) over a
:class:`gqa_prune.compensation.LayerWalk`. The in-memory pipeline (:mod:`gqa_prune.pipeline`,
every layer resident) and the streamed one (:mod:`gqa_prune.streaming.pipeline`) differ only
in the walk and in how unit scores are computed; this module imports neither, so both point
here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from gqa_prune.allocation import Allocation, AllocationConfig, allocate, allocate_global
from gqa_prune.compensation import (
    LayerWalk,
    check_compensation,
    check_selection,
    check_sensitivity_weights,
    prune_layerwise_,
    repair_sensitivity,
)
from gqa_prune.errors import GQAPruneError
from gqa_prune.importance import UnitScores
from gqa_prune.models.geometry import GQAGeometry
from gqa_prune.plan import LayerPlan, PruningPlan

log = logging.getLogger(__name__)

PruningMode = Literal["layer", "global", "sensitivity"]
PRUNING_MODES: tuple[str, ...] = ("layer", "global", "sensitivity")


def select_gqa_groups_to_prune(
    group_importance: torch.Tensor, target_num_kv_heads: int
) -> tuple[list[int], list[int]]:
    """Split group indices into the ``target_num_kv_heads`` most important and the rest.

    Ties break towards the lower index (stable), so the result is deterministic.

    Returns:
        ``(keep, prune)``, each sorted ascending.
    """
    n = group_importance.numel()
    if not 0 <= target_num_kv_heads <= n:
        raise GQAPruneError(f"cannot keep {target_num_kv_heads} of {n} KV groups")
    order = torch.sort(group_importance.double(), descending=True, stable=True).indices.tolist()
    return sorted(order[:target_num_kv_heads]), sorted(order[target_num_kv_heads:])


def select_channels_to_keep(channel_importance: torch.Tensor, target: int) -> list[int]:
    """Indices of the ``target`` most important MLP channels, sorted ascending."""
    return select_gqa_groups_to_prune(channel_importance, target)[0]


def build_plan(scores: UnitScores, allocation: Allocation, geometry: GQAGeometry) -> PruningPlan:
    """Keep, in every layer, the highest-scoring groups and channels the allocation allows."""
    layers = []
    for la, g_scores, c_scores in zip(
        allocation.layers, scores.groups, scores.channels, strict=True
    ):
        keep_groups, _ = select_gqa_groups_to_prune(g_scores, la.kv_heads_after)
        keep_channels = select_channels_to_keep(c_scores, la.channels_after)
        layers.append(LayerPlan(la.layer, tuple(keep_groups), tuple(keep_channels)))
    return PruningPlan(tuple(layers), geometry.queries_per_kv, geometry.head_dim)


@dataclass(frozen=True)
class PruneOutcome:
    """What :func:`gqa_prune.pipeline.prune_model_` (or its streamed twin) did."""

    plan: PruningPlan
    allocation: Allocation
    before: GQAGeometry
    after: GQAGeometry
    scores: UnitScores


def plan_pruning(
    before: GQAGeometry,
    allocation_config: AllocationConfig,
    layer_importance: Sequence[float] | None,
    mode: str,
    score_units: Callable[[], UnitScores],
    needs_scores: bool = True,
    sensitivity: Callable[[], UnitScores] | None = None,
) -> tuple[Allocation, UnitScores, PruningPlan]:
    """Allocate per-layer budgets and pick the units to keep (no weight changes).

    In ``layer`` mode the allocation runs before the (costly) scoring, so an impossible
    target fails fast; ``global`` mode needs the scores to allocate.

    Args:
        before: the model's current shapes.
        allocation_config: target, strategy and constraints.
        layer_importance: one score per layer; None = all equal.
        mode: ``layer``, ``global`` or ``sensitivity``.
        score_units: computes the unit scores (in memory or streamed).
        needs_scores: False = skip ``score_units`` (``layer`` mode only): every unit scores
            0, so the plan keeps the first units of each layer and only its counts matter
            (``selection="repair"`` chooses the units).
        sensitivity: computes the repair's unit costs (``sensitivity`` mode, which
            allocates on them as ``global`` does on scores).
    """
    if mode not in PRUNING_MODES:
        raise GQAPruneError(
            f"unknown pruning mode '{mode}'; choose one of {', '.join(PRUNING_MODES)}"
        )
    importance = (
        list(layer_importance) if layer_importance is not None else [1.0] * before.num_layers
    )
    if mode == "layer":
        allocation = allocate(importance, before, allocation_config)
    if mode == "sensitivity":
        if sensitivity is None:
            raise GQAPruneError("pruning mode 'sensitivity' is not available here")
        scores = sensitivity()
    else:
        scores = score_units() if needs_scores or mode == "global" else zero_scores(before)
    if mode != "layer":
        allocation = allocate_global(
            scores.groups, scores.channels, before, allocation_config, importance=importance
        )
    log.info(
        "allocation (%s): remove %d parameters = %.2f%% of %d total, %.2f%% of %d "
        "non-embedding (target %.2f%% of %s)",
        mode,
        allocation.params_removed,
        100 * allocation.params_removed / before.total_params,
        before.total_params,
        100 * allocation.params_removed / max(before.non_embedding_params, 1),
        before.non_embedding_params,
        100 * allocation.target_ratio,
        allocation.pruning_ratio_basis.replace("_", "-"),
    )
    return allocation, scores, build_plan(scores, allocation, before)


def needs_unit_scores(mode: str, selection: str) -> bool:
    """Whether the plan needs unit scores (of ``criterion``): not for ``repair`` selection in
    ``layer`` mode, never in ``sensitivity`` mode (it measures its own costs)."""
    return mode == "global" or (mode == "layer" and selection != "repair")


def zero_scores(geometry: GQAGeometry) -> UnitScores:
    """All-zero scores of ``geometry``'s units (stand-ins where only counts matter)."""
    return UnitScores(
        [torch.zeros(n) for n in geometry.kv_heads],
        [torch.zeros(n) for n in geometry.intermediate_sizes],
    )


def prune_walk_(
    walk: LayerWalk,
    calibration_ids: torch.Tensor,
    allocation_config: AllocationConfig,
    layer_importance: Sequence[float] | None,
    mode: str,
    score_units: Callable[[], UnitScores],
    check_finite: Callable[[torch.Tensor, str], None],
    *,
    batch_size: int,
    progress: bool,
    compensation: str,
    compensation_ids: torch.Tensor | None,
    compensation_damp: float,
    selection: str,
    compensation_target: str,
    compensation_target_norm: str,
    sensitivity_weights: str,
    before_planning: Callable[[], object] | None = None,
) -> PruneOutcome:
    """Prune the model that ``walk`` holds, in place: the step both pipelines run.

    Args:
        walk: the decoder layers, resident or streamed.
        score_units: computes the unit scores (only when the mode and selection need them).
        check_finite: ``(input_ids, step)`` -> raise if the pruned model's logits are not
            finite.
        before_planning: called once the settings are checked, before anything costly
            (the streamed pipeline checks its memory cap there).
        others: as :func:`gqa_prune.pipeline.prune_model_`.
    """
    before = walk.adapter.geometry(walk.model)
    check_compensation(
        compensation, compensation_damp, compensation_target, compensation_target_norm
    )
    check_selection(selection, compensation)
    check_sensitivity_weights(sensitivity_weights)
    if before_planning is not None:
        before_planning()
    allocation, scores, plan = plan_pruning(
        before,
        allocation_config,
        layer_importance,
        mode,
        score_units,
        needs_scores=needs_unit_scores(mode, selection),
        sensitivity=lambda: repair_sensitivity(
            walk, calibration_ids, compensation_damp, batch_size, progress, sensitivity_weights
        ),
    )
    ids = calibration_ids if compensation_ids is None else compensation_ids
    plan, after = prune_layerwise_(
        walk,
        plan,
        ids,
        compensation,
        compensation_damp,
        batch_size,
        progress,
        selection,
        compensation_target,
        compensation_target_norm,
    )
    check_finite(calibration_ids[:1], "after pruning")
    return PruneOutcome(plan, allocation, before, after, scores)
