"""Reduce element-wise scores of a layer's weights to one score per GQA group / MLP channel.

A GQA group ``g`` owns q rows ``[g*r*d, (g+1)*r*d)``, k and v rows ``[g*d, (g+1)*d)``
(and those bias entries) and o_proj columns ``[g*r*d, (g+1)*r*d)``. An MLP channel
``c`` owns gate row ``c``, up row ``c`` (and their bias entries) and down column ``c``.
These are exactly the parameters slicing removes with the unit.

A criterion supplies an element-wise score (same shape as each parameter); the unit's
score is the ``sum`` (default), ``mean`` or ``max`` of its elements' scores. ``mean``
does not favour units with more parameters; ``max`` keeps a unit if any one weight in
it matters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, cast, get_args

import torch
from torch import nn

from gqa_prune.errors import GQAPruneError
from gqa_prune.models.adapters import ADAPTERS, ArchitectureAdapter

Aggregation = Literal["sum", "mean", "max"]
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)

# score_fn(param, kind) -> element-wise fp32 scores of the same shape as param.
# kind is "weight" or "bias".
ElementScore = Callable[[torch.Tensor, str], torch.Tensor]


@dataclass
class UnitScores:
    """Per-layer unit scores (fp32, CPU). Higher = more important.

    Attributes:
        groups: one tensor per layer, shape ``(num_kv_heads_l,)``.
        channels: one tensor per layer, shape ``(intermediate_size_l,)``.
    """

    groups: list[torch.Tensor]
    channels: list[torch.Tensor]

    def add_(self, other: UnitScores) -> None:
        """Add ``other``'s scores to these, in place (accumulation over batches)."""
        for mine, theirs in zip(
            self.groups + self.channels, other.groups + other.channels, strict=True
        ):
            mine += theirs

    def check_finite(self, step: str) -> None:
        """Raise a :class:`GQAPruneError` naming ``step`` if any score is NaN or inf."""
        for i, (g, c) in enumerate(zip(self.groups, self.channels, strict=True)):
            if not (torch.isfinite(g).all() and torch.isfinite(c).all()):
                raise GQAPruneError(
                    f"{step}: non-finite importance scores in layer {i}; check the model "
                    "weights and calibration data, or use --dtype float32"
                )


def check_aggregation(aggregation: str) -> None:
    """Raise a :class:`GQAPruneError` listing the valid names unless ``aggregation`` is one."""
    if aggregation not in AGGREGATIONS:
        raise GQAPruneError(
            f"unknown aggregation '{aggregation}'; choose one of: {', '.join(AGGREGATIONS)}"
        )


def _aggregate(rows: torch.Tensor, aggregation: str) -> torch.Tensor:
    """``(units, elements)`` -> ``(units,)``."""
    check_aggregation(aggregation)
    if aggregation == "sum":
        return rows.sum(dim=1)
    if aggregation == "mean":
        return rows.mean(dim=1)
    return rows.amax(dim=1)


def compute_gqa_group_importance(
    layer: nn.Module,
    score_fn: ElementScore,
    aggregation: Aggregation = "sum",
    adapter: ArchitectureAdapter = ADAPTERS["llama"],
) -> torch.Tensor:
    """One score per GQA group of ``layer``'s attention.

    Args:
        layer: a decoder layer.
        score_fn: element-wise score of a parameter (e.g. ``|w * grad|`` for Taylor).
        aggregation: how a group's element scores combine: ``sum``, ``mean`` or ``max``.
        adapter: projection names.

    Returns:
        fp32 tensor of shape ``(num_kv_heads,)`` (empty once the attention was removed).
    """
    if not adapter.has_attention(layer):
        return torch.zeros(0)
    attn = adapter.attention(layer)
    q, k, v, o = adapter.attention_projections(layer)
    d = int(cast(int, attn.head_dim))
    n_kv = k.out_features // d
    parts = [
        score_fn(q.weight, "weight").reshape(n_kv, -1),
        score_fn(k.weight, "weight").reshape(n_kv, -1),
        score_fn(v.weight, "weight").reshape(n_kv, -1),
        # o_proj columns: (hidden, n_kv * r * d) -> (n_kv, hidden * r * d)
        score_fn(o.weight, "weight")
        .reshape(o.out_features, n_kv, -1)
        .transpose(0, 1)
        .reshape(n_kv, -1),
    ]
    parts += [score_fn(p.bias, "bias").reshape(n_kv, -1) for p in (q, k, v) if p.bias is not None]
    return _aggregate(torch.cat([p.float() for p in parts], dim=1), aggregation).cpu()


def compute_mlp_channel_importance(
    layer: nn.Module,
    score_fn: ElementScore,
    aggregation: Aggregation = "sum",
    adapter: ArchitectureAdapter = ADAPTERS["llama"],
) -> torch.Tensor:
    """One score per MLP channel of ``layer`` (gate row + up row + down column).

    Returns:
        fp32 tensor of shape ``(intermediate_size,)``.
    """
    gate, up, down = adapter.mlp_projections(layer)
    parts = [
        score_fn(gate.weight, "weight"),
        score_fn(up.weight, "weight"),
        score_fn(down.weight, "weight").t(),
    ]
    parts += [score_fn(p.bias, "bias")[:, None] for p in (gate, up) if p.bias is not None]
    return _aggregate(torch.cat([p.float() for p in parts], dim=1), aggregation).cpu()


def layer_unit_scores(
    model: nn.Module, adapter: ArchitectureAdapter, score_fn: ElementScore, aggregation: Aggregation
) -> UnitScores:
    """Apply both reductions to every decoder layer of ``model``."""
    layers = adapter.decoder_layers(model)
    return UnitScores(
        groups=[compute_gqa_group_importance(ly, score_fn, aggregation, adapter) for ly in layers],
        channels=[
            compute_mlp_channel_importance(ly, score_fn, aggregation, adapter) for ly in layers
        ],
    )
