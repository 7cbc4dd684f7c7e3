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
    ``pruning_ratio`` is a fraction of ALL parameters (embeddings included).

Whole groups and channels
    The attention budget is ``B_A = sum_l rate_l * A_l`` (``A_l`` = attention params; the
    same rate for attention and MLP) or, with ``distribution=(a, m)``,
    ``B_A = a / (a + m) * pruning_ratio * total_params``; only one part pruned -> all of
    the budget goes there. ``round(B_A / params_per_group)`` groups are shared among layers
    in proportion to ``rate_l * kv_heads_l`` (largest remainder). The MLP absorbs the
    rest: with the groups fixed, each layer's removal target becomes
    ``clip(c' * w_l * P_l, window_l)`` (``c'`` re-solved by bisection), channel counts are
    rounded down to the allowed grid, and the solver adds one channel (or one
    ``mlp_round_to`` block) at a time to the layer furthest below its target, never
    letting a layer pass the rate of a layer the strategy ranks above it. If that cannot
    land within +-0.5 % of the target, neighbouring group counts are tried, then the
    ordering constraint is dropped (only possible with uneven layer sizes or coarse
    grids); if nothing lands, ``GQAPruneError`` says why.

Bounds
    ``min_pruning_rate <= removed_l / P_l <= max_pruning_rate`` holds exactly, after
    rounding, for every prunable layer. The floors come on top: every layer keeps >= 1 KV
    group (unless ``allow_attention_removal``) and >= ``min_mlp_channels`` channels, so
    ``max_pruning_rate=1`` means "as much as the floors allow". Kept channel counts are
    multiples of ``mlp_round_to``; a layer too small to hold a multiple >=
    ``min_mlp_channels`` below its size rounds to single channels instead.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any, Literal, get_args

import numpy as np

from gqa_prune.errors import GQAPruneError
from gqa_prune.models.geometry import GQAGeometry

Strategy = Literal["inverse", "proportional", "uniform"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
TOLERANCE = 0.005  # |achieved_ratio - pruning_ratio| guaranteed by allocate / allocate_global


def _bad(name: str, value: Any, expected: str, fix: str = "") -> GQAPruneError:
    return GQAPruneError(f"--{name}={value!r} is invalid: expected {expected}" + (f"; {fix}" if fix else ""))


def _real(name: str, value: Any, lo: float, hi: float, lo_open: bool, hi_open: bool) -> None:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if ok and math.isfinite(value):
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise _bad(name, value, f"a number in {interval}")


def _int(name: str, value: Any, lo: int) -> None:
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
        freeze_top_n_layers: the n most important in-range layers are not pruned.
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
        _real("pruning_ratio", self.pruning_ratio, 0.0, 1.0, True, True)
        if self.strategy not in STRATEGIES:
            raise _bad("strategy", self.strategy, f"one of {', '.join(STRATEGIES)}")
        _real("alpha", self.alpha, 0.0, math.inf, False, True)
        _real("min_pruning_rate", self.min_pruning_rate, 0.0, 1.0, False, True)
        _real("max_pruning_rate", self.max_pruning_rate, 0.0, 1.0, True, False)
        if self.min_pruning_rate > self.max_pruning_rate:
            raise _bad("min_pruning_rate", self.min_pruning_rate,
                       f"<= --max_pruning_rate={self.max_pruning_rate}", "lower one or raise the other")
        _int("freeze_top_n_layers", self.freeze_top_n_layers, 0)
        for name in ("layer_start", "layer_end"):
            if getattr(self, name) is not None:
                _int(name, getattr(self, name), 0)
        if self.layer_start is not None and self.layer_end is not None \
                and self.layer_start >= self.layer_end:
            raise _bad("layer_start", self.layer_start, f"< --layer_end={self.layer_end}",
                       "the range [layer_start, layer_end) must hold at least one layer")
        if self.distribution is not None:
            d = tuple(self.distribution)
            if len(d) != 2:
                raise _bad("distribution", self.distribution, "two numbers attention:mlp, e.g. 2:8")
            for part in d:
                _real("distribution", part, 0.0, math.inf, False, True)
            if d[0] + d[1] <= 0:
                raise _bad("distribution", self.distribution, "a positive attention:mlp split",
                           "e.g. 2:8, or leave it unset for equal rates")
            object.__setattr__(self, "distribution", (float(d[0]), float(d[1])))
        for name in ("prune_attention", "prune_mlp", "allow_attention_removal"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, getattr(self, name), "True or False")
        if not (self.prune_attention or self.prune_mlp):
            raise _bad("prune_attention", False, "attention or MLP pruning enabled",
                       "with both --prune_attention and --prune_mlp off nothing can be removed")
        _int("mlp_round_to", self.mlp_round_to, 1)
        _int("min_mlp_channels", self.min_mlp_channels, 1)


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
            return cls(layers=tuple(LayerAllocation(**la) for la in d["layers"]),
                       params_removed=int(d["params_removed"]), total_params=int(d["total_params"]),
                       achieved_ratio=float(d["achieved_ratio"]),
                       target_ratio=float(d["target_ratio"]))
        except (KeyError, TypeError) as err:
            raise GQAPruneError(f"not a saved Allocation ({err!r}); expected the keys written "
                                "by Allocation.to_dict") from err


# --------------------------------------------------------------------------- lattice
@dataclass(frozen=True)
class _Layer:
    """What one prunable layer can remove: whole groups and channels on an allowed grid.

    Removable channel counts ``h`` are 0 and ``inter - m * q`` for ``m`` in ``[mbot, mtop]``
    (kept = ``m * q``). ``lo``/``hi`` are the min/max-rate bounds in parameters.
    """

    kv: int
    inter: int
    size: int
    gmax: int
    q: int
    mbot: int
    mtop: int
    lo: int
    hi: int
    ppg: int
    ppc: int

    @property
    def hmax(self) -> int:
        return self.inter - self.mbot * self.q if self.mbot <= self.mtop else 0

    def h_floor(self, x: int) -> int | None:
        """Largest allowed channel removal <= x."""
        if x < 0:
            return None
        if self.mbot > self.mtop or x < self.inter - self.mtop * self.q:
            return 0
        return min(self.hmax, self.inter + ((x - self.inter) // self.q) * self.q)

    def h_ceil(self, x: int) -> int | None:
        """Smallest allowed channel removal >= x."""
        if x <= 0:
            return 0
        if x > self.hmax:
            return None
        return max(self.inter - self.mtop * self.q, self.inter - ((self.inter - x) // self.q) * self.q)

    def v_floor(self, g: int, y: int) -> int | None:
        h = self.h_floor((y - g * self.ppg) // self.ppc)
        return None if h is None else g * self.ppg + h * self.ppc

    def v_ceil(self, g: int, y: int) -> int | None:
        h = self.h_ceil(-((g * self.ppg - y) // self.ppc))
        return None if h is None else g * self.ppg + h * self.ppc

    def v_next(self, g: int, v: int) -> int | None:
        return self.v_ceil(g, v + 1)

    def window(self, g: int) -> tuple[int, int] | None:
        """Removable params with g groups that respect the rate bounds, as (lowest, highest)."""
        lo, hi = self.v_ceil(g, self.lo), self.v_floor(g, self.hi)
        return None if lo is None or hi is None or lo > hi else (lo, hi)


def _make_layer(geometry: GQAGeometry, config: AllocationConfig, idx: int) -> _Layer:
    kv, inter = geometry.kv_heads[idx], geometry.intermediate_sizes[idx]
    size = geometry.attention_params(idx) + geometry.mlp_params(idx)
    gmax = (kv if config.allow_attention_removal else max(kv - 1, 0)) if config.prune_attention else 0
    q = config.mlp_round_to
    mbot, mtop = -(-config.min_mlp_channels // q), (inter - 1) // q
    if mbot > mtop:  # too small for the grid: round to single channels
        q, mbot, mtop = 1, config.min_mlp_channels, inter - 1
    if not config.prune_mlp:
        mbot, mtop = 1, 0
    lo = math.ceil(Fraction(config.min_pruning_rate) * size)
    hi = math.floor(Fraction(config.max_pruning_rate) * size)
    return _Layer(kv, inter, size, gmax, q, mbot, mtop, lo, hi,
                  geometry.params_per_group, geometry.params_per_channel)


# --------------------------------------------------------------------------- selection
def _check_geometry(geometry: GQAGeometry, n_scores: int, what: str) -> None:
    if n_scores != geometry.num_layers:
        raise GQAPruneError(f"{what} has {n_scores} entries but the model has "
                            f"{geometry.num_layers} layers; pass one value per decoder layer")
    if geometry.total_params <= 0:
        raise GQAPruneError(f"geometry.total_params={geometry.total_params}; build the geometry "
                            "with the model's total parameter count")


def _prunable(importance: np.ndarray, geometry: GQAGeometry, config: AllocationConfig) -> list[int]:
    """Layers in range, minus the freeze_top_n_layers most important ones, ascending."""
    n = geometry.num_layers
    start = 0 if config.layer_start is None else config.layer_start
    end = n if config.layer_end is None else config.layer_end
    if start >= n or end > n or start >= end:
        raise GQAPruneError(f"--layer_start={config.layer_start} --layer_end={config.layer_end} is "
                            f"not a non-empty range inside the model's {n} layers; use 0 <= "
                            f"layer_start < layer_end <= {n}")
    in_range = list(range(start, end))
    if config.freeze_top_n_layers >= len(in_range):
        raise GQAPruneError(f"--freeze_top_n_layers={config.freeze_top_n_layers} would freeze all "
                            f"{len(in_range)} layers in [{start}, {end}); use at most "
                            f"{len(in_range) - 1} or widen --layer_start/--layer_end")
    by_importance = sorted(in_range, key=lambda i: (-importance[i], i))
    frozen = set(by_importance[: config.freeze_top_n_layers])
    keep = [i for i in in_range if i not in frozen and geometry.attention_params(i)
            + geometry.mlp_params(i) > 0]
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
    key = {"inverse": lambda k: (imp[k], k), "proportional": lambda k: (-imp[k], k),
           "uniform": lambda k: (0.0, k)}[config.strategy]
    return w, sorted(range(imp.size), key=key)


def _solve_scale(base: np.ndarray, lo: np.ndarray, hi: np.ndarray, target: float) -> np.ndarray:
    """clip(c * base, lo, hi) with c >= 0 chosen by bisection so that the sum hits target."""
    def total(c: float) -> float:
        return float(np.clip(c * base, lo, hi).sum())

    c_hi = 1.0
    for _ in range(2000):
        if total(c_hi) >= target:
            break
        c_hi *= 2.0
    c_lo = 0.0
    for _ in range(200):
        mid = 0.5 * (c_lo + c_hi)
        c_lo, c_hi = (mid, c_hi) if total(mid) < target else (c_lo, mid)
    return np.clip(c_hi * base, lo, hi)


def _largest_remainder(x: np.ndarray, n_total: int, lo: np.ndarray, hi: np.ndarray) -> list[int]:
    """Integers within [lo, hi] summing to n_total, close to x; ties favour earlier positions."""
    g = np.clip(np.floor(x + 1e-9), lo, hi).astype(int)
    frac = x - g
    missing = n_total - int(g.sum())
    step, order = (1, sorted(range(x.size), key=lambda k: (-frac[k], k))) if missing > 0 else \
        (-1, sorted(range(x.size), key=lambda k: (frac[k], -k)))
    for k in order * 2:
        if missing == 0:
            break
        if lo[k] <= g[k] + step <= hi[k]:
            g[k] += step
            missing -= step
    return [int(v) for v in g]
