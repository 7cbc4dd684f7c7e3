"""Unit importance: one score per GQA group and per MLP channel of every layer.

``compute_unit_scores(model, input_ids, criterion=...)`` is the entry point; one module
per criterion (``taylor``/``taylor2``, ``magnitude``, ``wanda``, ``random``) registers
it in :data:`~gqa_prune.importance.registry.SCORERS`.
"""

from gqa_prune.importance.base import (
    AGGREGATIONS,
    Aggregation,
    UnitScores,
    compute_gqa_group_importance,
    compute_mlp_channel_importance,
)
from gqa_prune.importance.compute import compute_unit_scores
from gqa_prune.importance.registry import CRITERIA, Criterion
from gqa_prune.importance.taylor import collect_taylor_scores

__all__ = [
    "AGGREGATIONS",
    "CRITERIA",
    "Aggregation",
    "Criterion",
    "UnitScores",
    "collect_taylor_scores",
    "compute_gqa_group_importance",
    "compute_mlp_channel_importance",
    "compute_unit_scores",
]
