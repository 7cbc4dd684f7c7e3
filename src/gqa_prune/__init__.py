"""gqa-prune: GQA-aware, unbalanced structured pruning of Hugging Face decoder LLMs."""

from gqa_prune.allocation import Allocation, AllocationConfig, allocate
from gqa_prune.config import RunConfig
from gqa_prune.data import load_text, sample_calibration, tokenize_text
from gqa_prune.errors import GQAPruneError
from gqa_prune.evaluation.perplexity import PerplexityResult, PPLMetric, evaluate_perplexity
from gqa_prune.evaluation.zeroshot import ZeroShotResult, evaluate_zeroshot
from gqa_prune.export import export_gguf
from gqa_prune.importance import (
    UnitScores,
    collect_taylor_scores,
    compute_gqa_group_importance,
    compute_mlp_channel_importance,
    compute_unit_scores,
)
from gqa_prune.models.adapters import get_adapter
from gqa_prune.models.checkpoint import load_pruned, save_pruned
from gqa_prune.models.geometry import GQAGeometry
from gqa_prune.models.loading import load_model
from gqa_prune.pipeline import build_plan, prune_model_, select_gqa_groups_to_prune
from gqa_prune.plan import LayerPlan, PruningPlan
from gqa_prune.recovery import FinetuneConfig, FinetuneResult, finetune_
from gqa_prune.runner import run_experiment
from gqa_prune.search import SearchConfig, search_distributions
from gqa_prune.slicing import apply_plan_, prune_attention_by_gqa_groups, prune_mlp_channels
from gqa_prune.streaming import LayerStreamer, StreamingConfig

__version__ = "0.1.0"

__all__ = [
    "Allocation",
    "AllocationConfig",
    "GQAGeometry",
    "GQAPruneError",
    "FinetuneConfig",
    "FinetuneResult",
    "LayerPlan",
    "LayerStreamer",
    "PPLMetric",
    "PerplexityResult",
    "PruningPlan",
    "RunConfig",
    "SearchConfig",
    "StreamingConfig",
    "UnitScores",
    "ZeroShotResult",
    "allocate",
    "apply_plan_",
    "build_plan",
    "collect_taylor_scores",
    "compute_gqa_group_importance",
    "compute_mlp_channel_importance",
    "compute_unit_scores",
    "evaluate_perplexity",
    "evaluate_zeroshot",
    "export_gguf",
    "finetune_",
    "get_adapter",
    "load_model",
    "load_pruned",
    "load_text",
    "prune_attention_by_gqa_groups",
    "prune_mlp_channels",
    "prune_model_",
    "run_experiment",
    "sample_calibration",
    "search_distributions",
    "save_pruned",
    "select_gqa_groups_to_prune",
    "tokenize_text",
]
