"""Apply a pruning plan layer by layer with one layer on the device (and compensate).

The layer-wise engine of :mod:`gqa_prune.compensation.sequential` run over a
:class:`~gqa_prune.streaming.executor.LayerStreamer`: the boundary hidden states rest on the
host and one layer is fetched at a time; the pruned layer is parked again (its file rewritten
with ``--offload_dir``). Same plan, same weights as in memory.
"""

from __future__ import annotations

import torch

from gqa_prune.compensation.sequential import (
    DEFAULT_DAMP,
    DEFAULT_TARGET,
    DEFAULT_TARGET_NORM,
    prune_layerwise_,
)
from gqa_prune.models.geometry import GQAGeometry
from gqa_prune.plan import PruningPlan
from gqa_prune.streaming.executor import LayerStreamer


@torch.no_grad()
def streaming_apply_plan_(
    streamer: LayerStreamer,
    plan: PruningPlan,
    calibration_ids: torch.Tensor | None,
    compensation: str = "lstsq",
    damp: float = DEFAULT_DAMP,
    batch_size: int = 8,
    progress: bool = False,
    target: str = DEFAULT_TARGET,
    target_norm: str = DEFAULT_TARGET_NORM,
) -> GQAGeometry:
    """Slice the streamed model to ``plan`` one layer at a time, compensating each cut.

    Arguments as :func:`gqa_prune.compensation.apply_plan_sequential_` (choosing the units
    too: :func:`gqa_prune.compensation.prune_layerwise_` over the streamer).

    Returns:
        The geometry of the pruned model.
    """
    args = (compensation, damp, batch_size, progress, "score", target, target_norm)
    return prune_layerwise_(streamer, plan, calibration_ids, *args)[1]
