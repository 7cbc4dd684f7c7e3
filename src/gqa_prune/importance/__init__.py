"""Unit importance: one score per GQA group and per MLP channel of every layer."""

from gqa_prune.importance.base import UnitScores, compute_gqa_group_importance, compute_mlp_channel_importance
from gqa_prune.importance.taylor import collect_taylor_scores

__all__ = [
    "UnitScores",
    "collect_taylor_scores",
    "compute_gqa_group_importance",
    "compute_mlp_channel_importance",
]
