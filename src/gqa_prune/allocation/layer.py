"""``--pruning_mode layer``: layer importance + a target ratio -> groups and channels to keep.

Pure arithmetic over a :class:`GQAGeometry`; no model, no torch.

Which layers are pruned
    The *prunable* layers are those in ``[layer_start, layer_end)`` minus the
    ``freeze_top_n_layers`` most important of them (ties: lower index first). All other
    layers are left exactly as they are.

Rates (``allocate``)
    For prunable layer ``l`` with importance ``I_l`` and ``P_l`` prunable parameters
    (``kv_heads * params_per_group + intermediate_size * params_per_channel``)::

        s_l    = (I_l - min I) / (max I - min I)   min/max over prunable layers; 0 if all equal
        w_l    = exp(-alpha * s_l)   inverse:      more important -> lower rate
                 exp(+alpha * s_l)   proportional: more important -> higher rate
                 1                   uniform       (alpha = 0 makes every strategy uniform)
        rate_l = clip(c * w_l, min_pruning_rate, max_pruning_rate)
        sum_l rate_l * P_l = pruning_ratio * B                      (c by bisection)

    ``rate_l`` is the removed fraction of the layer's attention+MLP parameters;
    ``pruning_ratio`` is a fraction of ``B``: ALL parameters (``pruning_ratio_basis=total``,
    embeddings included) or the transformer body (``non_embedding``; see
    :mod:`gqa_prune.allocation.target`). The clip bounds are narrowed to what the layer can
    really reach (floors, whole groups, grid).

Whole groups and channels
    Attention budget: ``B_A = sum_l rate_l * A_l`` (``A_l`` = attention params: the same
    rate for attention and MLP), or ``B_A = a / (a + m) * pruning_ratio * B``
    with ``distribution=(a, m)``; when only one part can be pruned it takes everything.
    ``round(B_A / params_per_group)`` groups are shared by ``rate_l * kv_heads_l``
    (largest remainder; ties go to the layer the strategy favours). The MLP absorbs the
    rest: with the groups fixed, layer ``l`` aims at ``clip(c' * w_l * P_l, window_l)``
    removed params (``c'`` again by bisection), rounds down to its channel grid, and the
    fix-up adds one grid step (1 or ``mlp_round_to`` channels) at a time to the layer
    furthest below its aim, never lifting a layer above the rate of a layer the strategy
    ranks before it. If that misses +-0.5 %, the nearest other group totals are tried,
    then an exact subset-sum search over all per-layer (groups, channels) choices
    (identical layers still ordered by the strategy); only if that search is too large
    is the ordering dropped. Nothing within +-0.5 % of ``B`` -> ``GQAPruneError`` with the
    reason.

Bounds
    ``min_pruning_rate <= removed_l / P_l <= max_pruning_rate`` holds exactly, after
    rounding, for every prunable layer. The floors come on top: every layer keeps >= 1 KV
    group (unless ``allow_attention_removal``) and >= ``min_mlp_channels`` channels, so
    ``max_pruning_rate=1`` means "as much as the floors allow". Kept channel counts are
    multiples of ``mlp_round_to``; a layer too small to hold a multiple >=
    ``min_mlp_channels`` below its size rounds to single channels instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gqa_prune.allocation.config import AllocationConfig
from gqa_prune.allocation.result import Allocation
from gqa_prune.allocation.solver import (
    check_reach,
    exact_fit,
    grid_of,
    search_groups,
    solve_scale,
)
from gqa_prune.allocation.target import Target, as_importance, build_allocation, prunable_layers
from gqa_prune.errors import GQAPruneError
from gqa_prune.models.geometry import GQAGeometry


def _weights(imp: np.ndarray, config: AllocationConfig) -> tuple[np.ndarray, list[int]]:
    """Strategy weights w (see module docstring) and the positions ordered by w, highest first."""
    span = imp.max() - imp.min()
    s = (imp - imp.min()) / span if span > 0 else np.zeros_like(imp)
    sign = {"inverse": -1.0, "proportional": 1.0, "uniform": 0.0}[config.strategy]
    w = np.exp(sign * config.alpha * s)
    key = {
        "inverse": lambda k: (imp[k], k),
        "proportional": lambda k: (-imp[k], k),
        "uniform": lambda k: (0.0, k),
    }[config.strategy]
    return w, sorted(range(imp.size), key=key)


def allocate(
    importance: Sequence[float], geometry: GQAGeometry, config: AllocationConfig
) -> Allocation:
    """Decide how many KV groups and MLP channels every layer keeps.

    Prunable layers are those in ``[layer_start, layer_end)`` minus the
    ``freeze_top_n_layers`` most important. With ``s_l`` the min-max normalised importance
    over prunable layers, ``w_l = exp(-alpha*s_l)`` (inverse), ``exp(alpha*s_l)``
    (proportional) or ``1`` (uniform), the layer rates are
    ``rate_l = clip(c * w_l, min_pruning_rate, max_pruning_rate)`` with ``c`` chosen by
    bisection so that ``sum_l rate_l * P_l = pruning_ratio * B`` (``P_l`` = the layer's
    attention + MLP params, ``B`` = the parameters of ``pruning_ratio_basis``). Whole
    groups are then shared by ``rate_l * kv_heads_l`` (or by ``distribution``), the MLP
    absorbs the rest, and a greedy fix-up moves single grid steps until the ratio is
    within +-0.5 % of ``B``, never giving a layer a higher rate than one the strategy ranks
    before it (an exact search is the fallback; see the module docstring). The rate bounds
    and floors hold exactly after rounding; frozen and out-of-range layers are returned
    untouched.

    Args:
        importance: one score per decoder layer (higher = more important), shape
            ``(num_layers,)``.
        geometry: the model's shapes and parameter counts (the ratio's denominator).
        config: target, basis and constraints.

    Returns:
        Allocation with ``|achieved_ratio - pruning_ratio| <= 0.005`` on the basis.

    Raises:
        GQAPruneError: the constraints cannot reach the target (the message says which,
            what the largest reachable ratio on the basis is, and what to change), or the
            inputs do not match the geometry.
    """
    imp = as_importance(importance, geometry)
    goal = Target.of(geometry, config)
    idx = prunable_layers(imp, geometry, config)
    w, local_order = _weights(imp[idx], config)
    order, w = [idx[k] for k in local_order], w[local_order]  # strategy order: highest w first
    grids = [grid_of(geometry, config, i) for i in order]
    target, tol = goal.params, goal.tol
    lo, hi = check_reach(grids, order, goal, config)
    sizes = np.array([grid.size for grid in grids], float)
    rate = solve_scale(w * sizes, lo, hi, target) / sizes  # the continuous rates rate_l
    ppg = geometry.params_per_group
    if not any(grid.hmax for grid in grids):
        budget = target  # attention only
    elif config.distribution is not None and config.prune_attention:
        a, m = config.distribution
        budget = target * a / (a + m)
    else:
        budget = float((rate * [grid.kv for grid in grids]).sum()) * ppg  # same rate as MLP
    plan: list[tuple[int, int]] | float | bool | None
    plan = search_groups(grids, w, rate, budget / ppg, target, tol, ordered=True)
    best = plan if isinstance(plan, float) else 0.0
    if isinstance(plan, float):  # exact search; order kept among identical layers
        plan = exact_fit(grids, target, tol, rate * sizes)
    if plan is False:  # too big for the exact search: drop the order constraint
        plan = search_groups(grids, w, rate, budget / ppg, target, tol, ordered=False)
        best = min(best, plan) if isinstance(plan, float) else best
    if isinstance(plan, list):
        return build_allocation(geometry, goal, dict(zip(order, plan, strict=True)))
    miss = "never land there" if plan is None else f"miss it by {goal.pct(best)} at best"
    raise GQAPruneError(
        f"cannot land within +-0.5% of {goal.flag}: whole KV groups ({goal.pct(ppg)} each) "
        f"and MLP steps of {config.mlp_round_to} channel(s) {miss}; lower --mlp_round_to or "
        "--min_mlp_channels, enable --prune_mlp, set --allow_attention_removal or choose a "
        "nearby ratio"
    )
