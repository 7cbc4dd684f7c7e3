"""PruningPlan: the JSON contract between scoring/allocation and slicing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gqa_prune.errors import GQAPruneError


@dataclass(frozen=True)
class LayerPlan:
    """What survives pruning in one decoder layer.

    Attributes:
        layer_idx: decoder layer index.
        keep_kv_groups: KV-head indices kept (sorted); the query heads that read a kept KV
            head are kept with it, so the Q:KV ratio is unchanged.
        keep_mlp_channels: indices into the MLP intermediate dimension (sorted).
    """

    layer_idx: int
    keep_kv_groups: tuple[int, ...]
    keep_mlp_channels: tuple[int, ...]


@dataclass(frozen=True)
class PruningPlan:
    """Kept units of every decoder layer, plus the geometry they index into."""

    layers: tuple[LayerPlan, ...]
    queries_per_kv: int
    head_dim: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "queries_per_kv": self.queries_per_kv,
            "head_dim": self.head_dim,
            "layers": [
                {
                    "layer_idx": lp.layer_idx,
                    "keep_kv_groups": list(lp.keep_kv_groups),
                    "keep_mlp_channels": list(lp.keep_mlp_channels),
                }
                for lp in self.layers
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningPlan:
        try:
            layers = tuple(
                LayerPlan(
                    layer_idx=int(d["layer_idx"]),
                    keep_kv_groups=tuple(int(i) for i in d["keep_kv_groups"]),
                    keep_mlp_channels=tuple(int(i) for i in d["keep_mlp_channels"]),
                )
                for d in data["layers"]
            )
            return cls(layers, int(data["queries_per_kv"]), int(data["head_dim"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise GQAPruneError(f"malformed pruning plan: {exc!r}") from exc

    def save(self, path: str | Path) -> None:
        from gqa_prune.io_utils import write_json_atomic

        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> PruningPlan:
        return cls.from_dict(json.loads(Path(path).read_text()))


def plan_summary(plan: PruningPlan) -> list[dict[str, int]]:
    """Per-layer kept counts (KV heads, Q heads, MLP channels)."""
    return [
        {
            "layer": lp.layer_idx,
            "kv_heads": len(lp.keep_kv_groups),
            "q_heads": len(lp.keep_kv_groups) * plan.queries_per_kv,
            "mlp_channels": len(lp.keep_mlp_channels),
        }
        for lp in plan.layers
    ]


__all__ = ["LayerPlan", "PruningPlan", "plan_summary"]
