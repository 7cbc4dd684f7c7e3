"""Random importance: the seeded baseline every real criterion has to beat.

Each GQA group and MLP channel gets an i.i.d. ``Uniform[0, 1)`` score from a CPU
``torch.Generator`` seeded with ``seed`` (the groups of all layers, then the channels),
so the same seed and model shapes give the same scores on any device. The scores are
drawn per unit, not per weight, so ``aggregation`` does not change them.
"""

from __future__ import annotations

import torch
from torch import nn

from gqa_prune.importance.base import Aggregation, UnitScores, check_aggregation
from gqa_prune.importance.registry import register_criterion
from gqa_prune.models.adapters import get_adapter


@register_criterion("random", needs_data=False)
def random_scores(
    model: nn.Module,
    input_ids: torch.Tensor | None = None,
    *,
    aggregation: Aggregation = "sum",
    batch_size: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> UnitScores:
    """Seeded uniform scores of every GQA group and MLP channel.

    Args:
        model: a causal LM; only its shapes are read.
        input_ids: unused.
        aggregation: validated, but has no effect (scores are drawn per unit).
        batch_size: unused.
        seed: seed of the generator; the same seed gives the same scores.
        progress: unused.

    Returns:
        Per-layer fp32 scores: groups ``(num_kv_heads,)``, channels ``(intermediate_size,)``.
    """
    check_aggregation(aggregation)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    geometry = get_adapter(model).geometry(model)
    groups = [torch.rand(n, generator=generator) for n in geometry.kv_heads]
    channels = [torch.rand(n, generator=generator) for n in geometry.intermediate_sizes]
    return UnitScores(groups=groups, channels=channels)
