"""What to prune and under which constraints: :class:`AllocationConfig`, validated on creation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np

from gqa_prune.errors import GQAPruneError

Strategy = Literal["inverse", "proportional", "uniform"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
Basis = Literal["total", "non_embedding"]
BASES: tuple[str, ...] = get_args(Basis)
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
    """How much to prune and how to spread it (see :mod:`gqa_prune.allocation.layer`).

    Attributes:
        pruning_ratio: fraction of the basis parameters to remove, in (0, 1).
        pruning_ratio_basis: what the ratio is a fraction of: ``total`` (every parameter,
            embeddings included; the original script's meaning) or ``non_embedding`` (the
            transformer body: attention, MLP and norms; without the input embedding and an
            untied LM head). See ``GQAGeometry.basis_params``.
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
    pruning_ratio_basis: Basis = "total"

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
        if self.pruning_ratio_basis not in BASES:
            raise _bad(
                "pruning_ratio_basis", self.pruning_ratio_basis, f"one of {', '.join(BASES)}"
            )
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
