"""Prune models larger than device memory: one decoder layer on the device at a time.

``LayerStreamer`` keeps the embeddings, final norm and lm_head on the compute device and
the decoder layers in CPU RAM or on disk (``offload_dir``); every step (layer importance,
unit scores of every criterion, compensation, perplexity) walks the layers with all
calibration batches, so each layer's weights visit the device once per pass.
:func:`gqa_prune.prune_model_` with ``streaming=`` runs the whole pruning step this way.
"""

from gqa_prune.streaming.compensation import streaming_apply_plan_
from gqa_prune.streaming.executor import LayerStreamer, StreamingConfig
from gqa_prune.streaming.layer_importance import streaming_layer_importance
from gqa_prune.streaming.loading import load_model_offloaded
from gqa_prune.streaming.memory import MemoryMonitor, MemoryPlan, parse_memory
from gqa_prune.streaming.pipeline import (
    check_streaming_memory,
    plan_memory,
    prune_model_streaming_,
    streaming_perplexity,
)
from gqa_prune.streaming.scores import STREAMING_SCORERS, streaming_unit_scores

__all__ = [
    "STREAMING_SCORERS",
    "LayerStreamer",
    "MemoryMonitor",
    "MemoryPlan",
    "StreamingConfig",
    "check_streaming_memory",
    "load_model_offloaded",
    "parse_memory",
    "plan_memory",
    "prune_model_streaming_",
    "streaming_apply_plan_",
    "streaming_layer_importance",
    "streaming_perplexity",
    "streaming_unit_scores",
]
