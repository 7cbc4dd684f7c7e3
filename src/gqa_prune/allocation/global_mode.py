"""``--pruning_mode global``: remove the cheapest units (score per parameter) of all layers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gqa_prune.allocation.config import AllocationConfig
from gqa_prune.allocation.greedy import remove_cheapest
from gqa_prune.allocation.result import Allocation
from gqa_prune.allocation.solver import check_reach, grid_of
from gqa_prune.allocation.target import (
    Target,
    as_importance,
    build_allocation,
    check_scores,
    prunable_layers,
)
from gqa_prune.errors import GQAPruneError
from gqa_prune.models.geometry import GQAGeometry


def allocate_global(
    group_scores: Sequence[Any],
    channel_scores: Sequence[Any],
    geometry: GQAGeometry,
    config: AllocationConfig,
    *,
    importance: Sequence[float] | None = None,
) -> Allocation:
    """``--pruning_mode global``: remove the cheapest units of all prunable layers.

    A unit is one GQA group or one MLP step (a channel, or the channels between two
    allowed kept counts with ``mlp_round_to``) of a prunable layer, priced
    ``score / params removed``. Within a layer units go lowest score first, so the caller
    removes each layer's lowest-scored groups and channels. First every layer takes its
    own cheapest units up to ``min_pruning_rate``; then units are taken cheapest first
    (greedy knapsack) until the target ``pruning_ratio * B`` is reached (``B`` = the
    parameters of ``pruning_ratio_basis``). A unit that would overshoot the target by more
    than 0.5 % of ``B`` or lift its layer above ``max_pruning_rate`` is skipped with the
    rest of its layer's queue. ``distribution=(a, m)`` is honoured: groups are taken first
    up to ``round(a/(a+m) * target / params_per_group)``, then channels, then (only if
    still short) anything. If the last unit was a group that crossed the target, the
    dearest MLP steps taken go back while the total stays at or above it, so the result
    lands within one MLP step above the target whenever there are channels to give back.
    Floors, range, freezing, ``prune_attention``/``prune_mlp`` and
    ``mlp_round_to`` apply as in :func:`~gqa_prune.allocation.allocate`; ``strategy`` and
    ``alpha`` do not.

    Args:
        group_scores: per layer one score per KV group (a 1-D tensor, array or list),
            ``(num_layers, kv_heads_l)``.
        channel_scores: per layer one score per MLP channel, ``(num_layers, intermediate_l)``.
        geometry: the model's shapes and parameter counts.
        config: target, basis and constraints.
        importance: per-layer importance ``(num_layers,)``, needed for
            ``freeze_top_n_layers`` (the highest values are frozen).

    Returns:
        Allocation with ``|achieved_ratio - pruning_ratio| <= 0.005`` on the basis.

    Raises:
        GQAPruneError: scores do not match the geometry, a layer cannot reach
            ``min_pruning_rate``, or the greedy ends outside +-0.5 % (units run out or are
            too coarse; unlike the layer mode there is no exact fallback search).
    """
    for name, given in (("group_scores", group_scores), ("channel_scores", channel_scores)):
        check_scores(geometry, len(given), name)
    if importance is None and config.freeze_top_n_layers:
        raise GQAPruneError(
            f"--freeze_top_n_layers={config.freeze_top_n_layers} needs the layer "
            "importance; pass importance= or set it to 0"
        )
    imp = as_importance([0.0] * geometry.num_layers if importance is None else importance, geometry)
    goal = Target.of(geometry, config)
    layers = prunable_layers(imp, geometry, config)
    grids = {i: grid_of(geometry, config, i) for i in layers}
    check_reach(list(grids.values()), layers, goal, config)
    target, ppg = goal.params, geometry.params_per_group
    attention_goal = None
    if config.distribution is not None and config.prune_attention and config.prune_mlp:
        a, m = config.distribution
        attention_goal = round(target * a / (a + m) / ppg) * ppg
    per_layer = {i: (group_scores[i], channel_scores[i]) for i in grids}
    removed, total, short = remove_cheapest(grids, per_layer, target, goal.tol, attention_goal)
    if short is not None:
        raise GQAPruneError(
            f"layer {short} cannot reach --min_pruning_rate={config.min_pruning_rate} within its "
            f"floors and --max_pruning_rate={config.max_pruning_rate}; lower --min_pruning_rate"
        )
    if abs(total - target) > goal.tol:
        raise GQAPruneError(
            f"global pruning reaches {goal.pct(total)} instead of {goal.flag} (+-0.5%): the "
            "cheapest-first units overshoot or run into --max_pruning_rate; try --pruning_mode "
            "layer, lower --mlp_round_to, raise --max_pruning_rate or choose a nearby ratio"
        )
    return build_allocation(geometry, goal, removed)
