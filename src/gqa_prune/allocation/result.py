"""The outcome of an allocation: per-layer budgets and the ratios they reach."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from gqa_prune.allocation.config import BASES, Basis
from gqa_prune.errors import GQAPruneError


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
    """Per-layer budgets plus the achieved and requested ratio on the chosen basis.

    Attributes:
        layers: one budget per decoder layer.
        params_removed: parameters the budgets remove.
        total_params: all parameters of the model before pruning.
        achieved_ratio: ``params_removed`` over the basis count (see
            ``pruning_ratio_basis``); within 0.5 % of ``target_ratio``.
        target_ratio: the requested ``pruning_ratio``.
        pruning_ratio_basis: ``total`` or ``non_embedding``: what both ratios are
            fractions of.
        non_embedding_params: parameters of the transformer body before pruning (None
            in allocations saved before the basis existed).
    """

    layers: tuple[LayerAllocation, ...]
    params_removed: int
    total_params: int
    achieved_ratio: float
    target_ratio: float
    pruning_ratio_basis: Basis = "total"
    non_embedding_params: int | None = None

    @property
    def ratio_of_total(self) -> float:
        """Removed fraction of all parameters."""
        return self.params_removed / self.total_params

    @property
    def ratio_of_non_embedding(self) -> float | None:
        """Removed fraction of the non-embedding parameters (None if unknown)."""
        n = self.non_embedding_params
        return None if not n else self.params_removed / n

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (``from_dict`` inverts it)."""
        d = asdict(self)
        d["layers"] = [asdict(la) for la in self.layers]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Allocation:
        try:
            basis = d.get("pruning_ratio_basis", "total")
            if basis not in BASES:
                raise ValueError(f"pruning_ratio_basis={basis!r}")
            body = d.get("non_embedding_params")
            return cls(
                layers=tuple(LayerAllocation(**la) for la in d["layers"]),
                params_removed=int(d["params_removed"]),
                total_params=int(d["total_params"]),
                achieved_ratio=float(d["achieved_ratio"]),
                target_ratio=float(d["target_ratio"]),
                pruning_ratio_basis=basis,
                non_embedding_params=None if body is None else int(body),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise GQAPruneError(
                f"not a saved Allocation ({err!r}); expected the keys written by Allocation.to_dict"
            ) from err
