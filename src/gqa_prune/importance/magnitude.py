"""Magnitude importance: the L2 norm of a unit's parameters (no data needed).

A unit's parameters are the ones slicing removes with it (see :mod:`.base`): for a GQA
group its q/k/v rows, o_proj columns and q/k/v bias entries; for an MLP channel its gate
and up rows, down column and gate/up bias entries. With ``w`` ranging over them::

    sum   ->  sqrt(sum_i w_i**2)      the L2 norm of the unit (default)
    mean  ->  sqrt(mean_i w_i**2)     the RMS weight: does not grow with the unit's size
    max   ->  max_i |w_i|             the largest weight (the L-infinity norm)

i.e. always ``sqrt(aggregate(w**2))``.
"""

from __future__ import annotations

import torch
from torch import nn

from gqa_prune.importance.base import Aggregation, UnitScores, check_aggregation, layer_unit_scores
from gqa_prune.importance.registry import register_criterion
from gqa_prune.models.adapters import get_adapter


def _squared(param: torch.Tensor, kind: str) -> torch.Tensor:
    return param.detach().float().pow(2)


@register_criterion("magnitude", needs_data=False)
def magnitude_scores(
    model: nn.Module,
    input_ids: torch.Tensor | None = None,
    *,
    aggregation: Aggregation = "sum",
    batch_size: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> UnitScores:
    """Weight-norm score of every GQA group and MLP channel.

    Args:
        model: a causal LM; only its weights are read.
        input_ids: unused (accepted for the common scorer signature).
        aggregation: ``sum`` (L2 norm), ``mean`` (RMS) or ``max`` (largest ``|w|``).
        batch_size: unused.
        seed: unused.
        progress: unused.

    Returns:
        Per-layer fp32 scores: groups ``(num_kv_heads,)``, channels ``(intermediate_size,)``.
    """
    check_aggregation(aggregation)
    squares = layer_unit_scores(model, get_adapter(model), _squared, aggregation)
    scores = UnitScores(
        groups=[g.sqrt() for g in squares.groups],
        channels=[c.sqrt() for c in squares.channels],
    )
    scores.check_finite("magnitude importance")
    return scores
