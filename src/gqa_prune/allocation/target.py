"""The target in parameters, the prunable layers, and the Allocation they produce.

Shared by both modes (:mod:`~gqa_prune.allocation.layer`, :mod:`~gqa_prune.allocation.global_mode`).
The ratio is a fraction of ``B = geometry.basis_params(basis)``: all parameters (``total``) or
the transformer body (``non_embedding`` = total - input embedding - untied LM head). Only
attention and MLP parameters can be removed, so on either basis::

    target = pruning_ratio * B        |removed - target| <= 0.005 * B
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gqa_prune.allocation.config import TOLERANCE, AllocationConfig, Basis
from gqa_prune.allocation.result import Allocation, LayerAllocation
from gqa_prune.errors import GQAPruneError
from gqa_prune.models.geometry import GQAGeometry


@dataclass(frozen=True)
class Target:
    """The requested removal in parameters, on the config's basis.

    Attributes:
        ratio: ``pruning_ratio``.
        basis: ``total`` or ``non_embedding``.
        base: the basis parameter count ``B``.
    """

    ratio: float
    basis: Basis
    base: int

    @classmethod
    def of(cls, geometry: GQAGeometry, config: AllocationConfig) -> Target:
        base = geometry.basis_params(config.pruning_ratio_basis)
        if base <= 0 or geometry.embedding_params < 0:
            raise GQAPruneError(
                f"geometry has total_params={geometry.total_params}, embedding_params="
                f"{geometry.embedding_params}; build the geometry with the model's parameter "
                "counts (get_adapter(model).geometry(model))"
            )
        return cls(float(config.pruning_ratio), config.pruning_ratio_basis, base)

    @property
    def params(self) -> float:
        """Parameters to remove: ``ratio * B``."""
        return self.ratio * self.base

    @property
    def tol(self) -> float:
        """Allowed miss in parameters, a hair inside 0.5 % (landing aims strictly inside)."""
        return TOLERANCE * self.base * (1 - 1e-9)

    @property
    def edge(self) -> float:
        """The tolerance a hair outside 0.5 %: refusing only what is out of reach even there."""
        return TOLERANCE * self.base * (1 + 1e-9)

    @property
    def what(self) -> str:
        return "the non-embedding parameters" if self.basis == "non_embedding" else "the parameters"

    def pct(self, params: float) -> str:
        """``params`` as a percentage of the basis, e.g. ``12.30% of the parameters``."""
        return f"{params / self.base:.2%} of {self.what}"

    @property
    def flag(self) -> str:
        """The requested ratio as the user wrote it, with its basis when not ``total``."""
        if self.basis == "total":
            return f"--pruning_ratio={self.ratio}"
        return f"--pruning_ratio={self.ratio} (--pruning_ratio_basis {self.basis})"


def check_scores(geometry: GQAGeometry, n_scores: int, what: str) -> None:
    """One score per decoder layer."""
    if n_scores != geometry.num_layers:
        raise GQAPruneError(
            f"{what} has {n_scores} entries but the model has "
            f"{geometry.num_layers} layers; pass one value per decoder layer"
        )


def as_importance(importance: Sequence[float], geometry: GQAGeometry) -> np.ndarray:
    """Layer importance as a finite float vector of one entry per layer."""
    imp = np.asarray(importance, dtype=float).reshape(-1)
    check_scores(geometry, imp.size, "importance")
    if not np.isfinite(imp).all():
        raise GQAPruneError("importance contains NaN or inf; recompute the layer importance")
    return imp


def prunable_layers(
    importance: np.ndarray, geometry: GQAGeometry, config: AllocationConfig
) -> list[int]:
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


def build_allocation(
    geometry: GQAGeometry, target: Target, removed: dict[int, tuple[int, int]]
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
    return Allocation(
        layers=tuple(out),
        params_removed=total,
        total_params=geometry.total_params,
        achieved_ratio=total / target.base,
        target_ratio=target.ratio,
        pruning_ratio_basis=target.basis,
        non_embedding_params=geometry.non_embedding_params,
    )
