"""Layer importance: how much each decoder layer matters (removal, activation, block influence)."""

from gqa_prune.analysis.layer_importance import (
    FILE_NAME,
    LayerImportance,
    LayerImportanceAnalyzer,
    compute_layer_importance,
    layer_importance_methods,
    load_layer_importance,
    model_identity,
    removal_importance_naive,
)

__all__ = [
    "FILE_NAME",
    "LayerImportance",
    "LayerImportanceAnalyzer",
    "compute_layer_importance",
    "layer_importance_methods",
    "load_layer_importance",
    "model_identity",
    "removal_importance_naive",
]
