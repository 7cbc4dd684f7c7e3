"""Per-layer pruning budgets: layer importance + a target ratio -> groups and channels to keep.

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
        sum_l rate_l * P_l = pruning_ratio * total_params           (c by bisection)

    ``rate_l`` is the removed fraction of the layer's attention+MLP parameters;
    ``pruning_ratio`` is a fraction of ALL parameters (embeddings included). The clip
    bounds are narrowed to what the layer can really reach (floors, whole groups, grid).

Whole groups and channels
    Attention budget: ``B_A = sum_l rate_l * A_l`` (``A_l`` = attention params: the same
    rate for attention and MLP), or ``B_A = a / (a + m) * pruning_ratio * total_params``
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
    is the ordering dropped. Nothing within +-0.5 % -> ``GQAPruneError`` with the reason.

Bounds
    ``min_pruning_rate <= removed_l / P_l <= max_pruning_rate`` holds exactly, after
    rounding, for every prunable layer. The floors come on top: every layer keeps >= 1 KV
    group (unless ``allow_attention_removal``) and >= ``min_mlp_channels`` channels, so
    ``max_pruning_rate=1`` means "as much as the floors allow". Kept channel counts are
    multiples of ``mlp_round_to``; a layer too small to hold a multiple >=
    ``min_mlp_channels`` below its size rounds to single channels instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

import numpy as np

from gqa_prune.allocation_global import remove_cheapest
from gqa_prune.allocation_solver import exact_fit, grid_of, search_groups, solve_scale
from gqa_prune.errors import GQAPruneError
from gqa_prune.models.geometry import GQAGeometry

Strategy = Literal["inverse", "proportional", "uniform"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
TOLERANCE = 0.005  # |achieved_ratio - pruning_ratio| guaranteed by allocate / allocate_global


# name: (low, high, low excluded, high excluded) for the real-valued settings
_REAL_RANGES = {
    "pruning_ratio": (0.0, 1.0, True, True),
    "alpha": (0.0, math.inf, False, True),
    "min_pruning_rate": (0.0, 1.0, False, True),
    "max_pruning_rate": (0.0, 1.0, True, False),
}
_INT_MINIMA = {"freeze_top_n_layers": 0, "mlp_round_to": 1, "min_mlp_channels": 1}


def _bad(name: str, value: Any, expected: str, fix: str = "") -> GQAPruneError:
    fix = f"; {fix}" if fix else ""
    return GQAPruneError(f"--{name}={value!r} is invalid: expected {expected}{fix}")


def _check_real(name: str, value: Any, lo: float, hi: float, lo_open: bool, hi_open: bool) -> None:
    interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    real = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not real or not math.isfinite(value):
        raise _bad(name, value, f"a number in {interval}")
    above = value > lo if lo_open else value >= lo
    below = value < hi if hi_open else value <= hi
    if not (above and below):
        raise _bad(name, value, f"a number in {interval}")


def _check_int(name: str, value: Any, lo: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < lo:
        raise _bad(name, value, f"an integer >= {lo}")


@dataclass(frozen=True)
class AllocationConfig:
    """How much to prune and how to spread it (see the module docstring for the formulas).

    Attributes:
        pruning_ratio: fraction of ``geometry.total_params`` to remove, in (0, 1).
        strategy: ``inverse`` | ``proportional`` | ``uniform``.
        alpha: strength of the importance weighting, >= 0 (0 = uniform).
        min_pruning_rate: lower bound of every prunable layer's attention+MLP removed fraction.
        max_pruning_rate: upper bound of the same; the floors below still apply.
        freeze_top_n_layers: the n most important in-range layers are not pruned (at
            least one in-range layer must stay prunable; checked against the geometry).
        layer_start: first prunable layer (None = 0).
        layer_end: one past the last prunable layer (None = num_layers).
        distribution: ``(a, m)``: a/(a+m) of the removed parameters come from attention
            (as close as whole groups allow; the MLP absorbs the rest). None = same rate
            for attention and MLP.
        prune_attention: remove whole GQA groups.
        prune_mlp: remove MLP channels.
        mlp_round_to: kept channel counts are multiples of this.
        allow_attention_removal: a layer may lose all its KV groups.
        min_mlp_channels: every pruned layer keeps at least this many channels.
    """

    pruning_ratio: float
    strategy: Strategy = "inverse"
    alpha: float = 1.0
    min_pruning_rate: float = 0.0
    max_pruning_rate: float = 1.0
    freeze_top_n_layers: int = 0
    layer_start: int | None = None
    layer_end: int | None = None
    distribution: tuple[float, float] | None = None
    prune_attention: bool = True
    prune_mlp: bool = True
    mlp_round_to: int = 1
    allow_attention_removal: bool = False
    min_mlp_channels: int = 1

    def __post_init__(self) -> None:
        for name, bounds in _REAL_RANGES.items():
            _check_real(name, getattr(self, name), *bounds)
        for name, low in _INT_MINIMA.items():
            _check_int(name, getattr(self, name), low)
        for name in ("layer_start", "layer_end"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 0)
        for name in ("prune_attention", "prune_mlp", "allow_attention_removal"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, getattr(self, name), "True or False")
        if self.strategy not in STRATEGIES:
            raise _bad("strategy", self.strategy, f"one of {', '.join(STRATEGIES)}")
        if self.min_pruning_rate > self.max_pruning_rate:
            bound = f"<= --max_pruning_rate={self.max_pruning_rate}"
            raise _bad("min_pruning_rate", self.min_pruning_rate, bound, "lower it or raise that")
        start, end = self.layer_start, self.layer_end
        if start is not None and end is not None and start >= end:
            fix = "the range [layer_start, layer_end) must hold at least one layer"
            raise _bad("layer_start", self.layer_start, f"< --layer_end={self.layer_end}", fix)
        if not (self.prune_attention or self.prune_mlp):
            fix = "with both off nothing can be removed"
            raise _bad("prune_attention", False, "True when --prune_mlp is False", fix)
        if self.distribution is not None:
            d = tuple(self.distribution)
            if len(d) != 2:
                raise _bad("distribution", self.distribution, "two numbers attention:mlp, e.g. 2:8")
            for part in d:
                _check_real("distribution", part, 0.0, math.inf, False, True)
            if d[0] + d[1] <= 0:
                fix = "e.g. 2:8, or leave it unset for equal rates"
                raise _bad("distribution", self.distribution, "a positive attention:mlp split", fix)
            object.__setattr__(self, "distribution", (float(d[0]), float(d[1])))


@dataclass(frozen=True)
class LayerAllocation:
    """Budget of one decoder layer. Rates are removed fractions (0 = untouched)."""

    layer: int
    kv_heads_before: int
    kv_heads_after: int
    channels_before: int
    channels_after: int
    attention_rate: float
    mlp_rate: float
    rate: float


@dataclass(frozen=True)
class Allocation:
    """Per-layer budgets plus the achieved and requested ratio of ``total_params``."""

    layers: tuple[LayerAllocation, ...]
    params_removed: int
    total_params: int
    achieved_ratio: float
    target_ratio: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (``from_dict`` inverts it)."""
        d = asdict(self)
        d["layers"] = [asdict(la) for la in self.layers]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Allocation:
        try:
            return cls(
                layers=tuple(LayerAllocation(**la) for la in d["layers"]),
                params_removed=int(d["params_removed"]),
                total_params=int(d["total_params"]),
                achieved_ratio=float(d["achieved_ratio"]),
                target_ratio=float(d["target_ratio"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise GQAPruneError(
                f"not a saved Allocation ({err!r}); expected the keys written by Allocation.to_dict"
            ) from err


# --------------------------------------------------------------------------- helpers
def _check_geometry(geometry: GQAGeometry, n_scores: int, what: str) -> None:
    if n_scores != geometry.num_layers:
        raise GQAPruneError(
            f"{what} has {n_scores} entries but the model has "
            f"{geometry.num_layers} layers; pass one value per decoder layer"
        )
    if geometry.total_params <= 0:
        raise GQAPruneError(
            f"geometry.total_params={geometry.total_params}; build the geometry "
            "with the model's total parameter count"
        )


def _prunable(importance: np.ndarray, geometry: GQAGeometry, config: AllocationConfig) -> list[int]:
    """Layers in range, minus the freeze_top_n_layers most important ones, ascending."""
    n = geometry.num_layers
    start = 0 if config.layer_start is None else config.layer_start
    end = n if config.layer_end is None else config.layer_end
    if start >= n or end > n or start >= end:
        raise GQAPruneError(
            f"--layer_start={config.layer_start} --layer_end={config.layer_end} is "
            f"not a non-empty range inside the model's {n} layers; use 0 <= "
            f"layer_start < layer_end <= {n}"
        )
    in_range = list(range(start, end))
    if config.freeze_top_n_layers >= len(in_range):
        raise GQAPruneError(
            f"--freeze_top_n_layers={config.freeze_top_n_layers} would freeze all "
            f"{len(in_range)} layers in [{start}, {end}); use at most "
            f"{len(in_range) - 1} or widen --layer_start/--layer_end"
        )
    by_importance = sorted(in_range, key=lambda i: (-importance[i], i))
    frozen = set(by_importance[: config.freeze_top_n_layers])
    keep = [
        i
        for i in in_range
        if i not in frozen and geometry.attention_params(i) + geometry.mlp_params(i) > 0
    ]
    if not keep:
        raise GQAPruneError(f"no layer in [{start}, {end}) has parameters left to prune")
    return keep


def _as_importance(importance: Sequence[float], geometry: GQAGeometry) -> np.ndarray:
    imp = np.asarray(importance, dtype=float).reshape(-1)
    _check_geometry(geometry, imp.size, "importance")
    if not np.isfinite(imp).all():
        raise GQAPruneError("importance contains NaN or inf; recompute the layer importance")
    return imp


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


def _build(
    geometry: GQAGeometry, config: AllocationConfig, removed: dict[int, tuple[int, int]]
) -> Allocation:
    """Allocation from {layer: (groups removed, channels removed)}; other layers untouched."""
    ppg, ppc = geometry.params_per_group, geometry.params_per_channel
    out, total = [], 0
    for i in range(geometry.num_layers):
        g, h = removed.get(i, (0, 0))
        kv, inter = geometry.kv_heads[i], geometry.intermediate_sizes[i]
        params = g * ppg + h * ppc
        rate = params / (geometry.attention_params(i) + geometry.mlp_params(i) or 1)
        attn_rate, mlp_rate = g / kv if kv else 0.0, h / inter if inter else 0.0
        out.append(LayerAllocation(i, kv, kv - g, inter, inter - h, attn_rate, mlp_rate, rate))
        total += params
    ratio = total / geometry.total_params
    return Allocation(tuple(out), total, geometry.total_params, ratio, float(config.pruning_ratio))


def _pct(params: float, geometry: GQAGeometry) -> str:
    return f"{params / geometry.total_params:.2%}"


def allocate(
    importance: Sequence[float], geometry: GQAGeometry, config: AllocationConfig
) -> Allocation:
    """Decide how many KV groups and MLP channels every layer keeps.

    Prunable layers are those in ``[layer_start, layer_end)`` minus the
    ``freeze_top_n_layers`` most important. With ``s_l`` the min-max normalised importance
    over prunable layers, ``w_l = exp(-alpha*s_l)`` (inverse), ``exp(alpha*s_l)``
    (proportional) or ``1`` (uniform), the layer rates are
    ``rate_l = clip(c * w_l, min_pruning_rate, max_pruning_rate)`` with ``c`` chosen by
    bisection so that ``sum_l rate_l * P_l = pruning_ratio * total_params`` (``P_l`` = the
    layer's attention + MLP params). Whole groups are then shared by
    ``rate_l * kv_heads_l`` (or by ``distribution``), the MLP absorbs the rest, and a
    greedy fix-up moves single grid steps until the ratio is within +-0.5 %, never giving
    a layer a higher rate than one the strategy ranks before it (an exact search is the
    fallback; see the module docstring). The rate bounds and floors hold exactly after
    rounding; frozen and out-of-range layers are returned untouched.

    Args:
        importance: one score per decoder layer (higher = more important), shape
            ``(num_layers,)``.
        geometry: the model's shapes; ``total_params`` is the ratio's denominator.
        config: target and constraints.

    Returns:
        Allocation with ``|achieved_ratio - pruning_ratio| <= 0.005``.

    Raises:
        GQAPruneError: the constraints cannot reach the target (the message says which
            and what to change), or the inputs do not match the geometry.
    """
    imp = _as_importance(importance, geometry)
    idx = _prunable(imp, geometry, config)
    w, local_order = _weights(imp[idx], config)
    order, w = [idx[k] for k in local_order], w[local_order]  # strategy order: highest w first
    grids = [grid_of(geometry, config, i) for i in order]
    target = config.pruning_ratio * geometry.total_params
    tol = TOLERANCE * geometry.total_params * (1 - 1e-9)
    wins = [[win for g in range(grid.gmax + 1) if (win := grid.window(g))] for grid in grids]
    for i, options in zip(order, wins, strict=True):
        if not options:
            raise GQAPruneError(
                f"layer {i}: no whole number of groups and channels removes between "
                f"{config.min_pruning_rate:.1%} and {config.max_pruning_rate:.1%} of its params; "
                "widen --min_pruning_rate/--max_pruning_rate or lower --mlp_round_to"
            )
    lo = np.array([min(a for a, _ in win) for win in wins], float)
    hi = np.array([max(b for _, b in win) for win in wins], float)
    # refuse only what is out of reach even at the edge of the tolerance (float slack up);
    # landing itself aims strictly inside it (slack down)
    edge = TOLERANCE * geometry.total_params * (1 + 1e-9)
    if target - edge > hi.sum():
        raise GQAPruneError(
            f"--pruning_ratio={config.pruning_ratio} is out of reach: the {len(idx)} prunable "
            f"layers can remove at most {_pct(hi.sum(), geometry)} of the parameters (floors: "
            f"{'0' if config.allow_attention_removal else '1'} KV group, {config.min_mlp_channels} "
            f"MLP channels, --max_pruning_rate={config.max_pruning_rate}); lower --pruning_ratio, "
            "widen --layer_start/--layer_end, lower --freeze_top_n_layers or raise "
            "--max_pruning_rate"
        )
    if target + edge < lo.sum():
        raise GQAPruneError(
            f"--min_pruning_rate={config.min_pruning_rate} alone removes {_pct(lo.sum(), geometry)}"
            f" of the parameters, more than --pruning_ratio={config.pruning_ratio}; lower "
            "--min_pruning_rate or raise --pruning_ratio"
        )
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
        return _build(geometry, config, dict(zip(order, plan, strict=True)))
    miss = "never land there" if plan is None else f"miss it by {_pct(best, geometry)} at best"
    raise GQAPruneError(
        f"cannot land within +-0.5% of --pruning_ratio={config.pruning_ratio}: whole KV groups "
        f"({_pct(ppg, geometry)} of the model each) and MLP steps of {config.mlp_round_to} "
        f"channel(s) {miss}; lower --mlp_round_to or --min_mlp_channels, enable --prune_mlp, "
        "set --allow_attention_removal or choose a nearby ratio"
    )


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
    (greedy knapsack) until the target is reached. A unit that would overshoot the target
    by more than 0.5 % or lift its layer above ``max_pruning_rate`` is skipped with the
    rest of its layer's queue. ``distribution=(a, m)`` is honoured: groups are taken first
    up to ``round(a/(a+m) * target / params_per_group)``, then channels, then (only if
    still short) anything. Floors, range, freezing, ``prune_attention``/``prune_mlp`` and
    ``mlp_round_to`` apply as in :func:`allocate`; ``strategy`` and ``alpha`` do not.

    Args:
        group_scores: per layer one score per KV group (a 1-D tensor, array or list),
            ``(num_layers, kv_heads_l)``.
        channel_scores: per layer one score per MLP channel, ``(num_layers, intermediate_l)``.
        geometry: the model's shapes.
        config: target and constraints.
        importance: per-layer importance ``(num_layers,)``, needed for
            ``freeze_top_n_layers`` (the highest values are frozen).

    Returns:
        Allocation with ``|achieved_ratio - pruning_ratio| <= 0.005``.

    Raises:
        GQAPruneError: scores do not match the geometry, a layer cannot reach
            ``min_pruning_rate``, or the greedy ends outside +-0.5 % (units run out or are
            too coarse; unlike :func:`allocate` there is no exact fallback search).
    """
    for name, given in (("group_scores", group_scores), ("channel_scores", channel_scores)):
        _check_geometry(geometry, len(given), name)
    if importance is None and config.freeze_top_n_layers:
        raise GQAPruneError(
            f"--freeze_top_n_layers={config.freeze_top_n_layers} needs the layer "
            "importance; pass importance= or set it to 0"
        )
    imp = _as_importance(
        [0.0] * geometry.num_layers if importance is None else importance, geometry
    )
    grids = {i: grid_of(geometry, config, i) for i in _prunable(imp, geometry, config)}
    target = config.pruning_ratio * geometry.total_params
    tol = TOLERANCE * geometry.total_params * (1 - 1e-9)
    goal = None
    if config.distribution is not None and config.prune_attention and config.prune_mlp:
        a, m = config.distribution
        goal = round(target * a / (a + m) / geometry.params_per_group) * geometry.params_per_group
    per_layer = {i: (group_scores[i], channel_scores[i]) for i in grids}
    removed, total, short = remove_cheapest(grids, per_layer, target, tol, goal)
    if short is not None:
        raise GQAPruneError(
            f"layer {short} cannot reach --min_pruning_rate={config.min_pruning_rate} within its "
            f"floors and --max_pruning_rate={config.max_pruning_rate}; lower --min_pruning_rate"
        )
    if abs(total - target) > tol:
        raise GQAPruneError(
            f"global pruning reaches {_pct(total, geometry)} instead of --pruning_ratio="
            f"{config.pruning_ratio} (+-0.5%): the prunable units run out or are too coarse; "
            "lower --pruning_ratio, widen --layer_start/--layer_end, raise --max_pruning_rate "
            "or lower --mlp_round_to"
        )
    return _build(geometry, config, removed)
