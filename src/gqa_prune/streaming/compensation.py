"""Apply a pruning plan layer by layer with one layer on the device (and compensate).

The same per-layer work as :func:`gqa_prune.compensation.apply_plan_sequential_`
(statistics of the dense layer, slice, refit ``o_proj`` / ``down_proj``; then the pruned
layer's outputs feed the next layer), with the boundary hidden states on the host and one
layer fetched at a time; the pruned layer is parked again (its file rewritten with
``--offload_dir``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from gqa_prune.compensation.selection import check_selection
from gqa_prune.compensation.sequential import (
    DEFAULT_DAMP,
    add_output_biases_,
    check_calibration_ids,
    check_compensation,
    prune_layer_,
)
from gqa_prune.errors import GQAPruneError
from gqa_prune.models.geometry import GQAGeometry
from gqa_prune.plan import PruningPlan
from gqa_prune.slicing import (
    attention_cut,
    check_pruned_model,
    prune_attention_by_gqa_groups,
    prune_mlp_channels,
    update_config_,
)
from gqa_prune.streaming.executor import LayerStreamer


class _OnDevice(Sequence[torch.Tensor]):
    """Host tensors seen through ``.to(device)`` one at a time (never all on the device)."""

    def __init__(self, tensors: list[torch.Tensor], device: torch.device) -> None:
        self.tensors, self.device = tensors, device

    def __len__(self) -> int:
        return len(self.tensors)

    def __getitem__(self, i: Any) -> Any:
        return self.tensors[i].to(self.device)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (t.to(self.device) for t in self.tensors)


def _one_layer_model(streamer: LayerStreamer, layer: nn.Module) -> Any:
    """Just enough of a model for ``add_output_biases_``: its config and one decoder layer."""
    parts = streamer.adapter.layers_attr.split(".")
    obj: Any = nn.ModuleList([layer])
    for part in reversed(parts):
        obj = SimpleNamespace(**{part: obj})
    obj.config = streamer.model.config
    return obj


@torch.no_grad()
def streaming_apply_plan_(
    streamer: LayerStreamer,
    plan: PruningPlan,
    calibration_ids: torch.Tensor | None,
    compensation: str = "lstsq",
    damp: float = DEFAULT_DAMP,
    batch_size: int = 8,
    progress: bool = False,
) -> GQAGeometry:
    """Slice the streamed model to ``plan`` one layer at a time, compensating each cut.

    Arguments as :func:`gqa_prune.compensation.apply_plan_sequential_`.

    Returns:
        The geometry of the pruned model.
    """
    return streaming_prune_sequential_(
        streamer, plan, calibration_ids, compensation, damp, batch_size, progress
    )[1]


@torch.no_grad()
def streaming_prune_sequential_(
    streamer: LayerStreamer,
    plan: PruningPlan,
    calibration_ids: torch.Tensor | None,
    compensation: str = "lstsq",
    damp: float = DEFAULT_DAMP,
    batch_size: int = 8,
    progress: bool = False,
    selection: str = "score",
) -> tuple[PruningPlan, GQAGeometry]:
    """:func:`gqa_prune.compensation.prune_sequential_` with one layer on the device.

    Returns:
        ``(plan, geometry)``: the plan that was really applied, and the pruned geometry.
    """
    check_compensation(compensation, damp)
    check_selection(selection, compensation)
    adapter, model = streamer.adapter, streamer.model
    by_layer = {lp.layer_idx: lp for lp in plan.layers}
    if sorted(by_layer) != list(range(streamer.num_layers)):
        raise GQAPruneError(
            f"pruning plan covers layers {sorted(by_layer)} but the model has {streamer.num_layers}"
        )
    states: list[torch.Tensor] = []
    calls: list[Any] = []
    if compensation != "none":
        calibration_ids = check_calibration_ids(compensation, calibration_ids, batch_size)
        states, calls = streamer.capture(list(calibration_ids.split(batch_size)))
    n = streamer.num_layers
    applied = []
    for i in tqdm(range(n), desc=f"compensation {compensation} (streaming)", disable=not progress):
        lp = by_layer[i]
        applied.append(lp)
        with streamer.layer(i, changed=True) as layer:
            if compensation == "none":
                if attention_cut(layer, lp, plan, adapter):
                    prune_attention_by_gqa_groups(
                        layer, lp.keep_kv_groups, adapter, allow_removal=True
                    )
                if len(lp.keep_mlp_channels) != adapter.mlp_projections(layer)[0].out_features:
                    prune_mlp_channels(layer, lp.keep_mlp_channels, adapter)
                continue
            if compensation == "bias":
                add_output_biases_(_one_layer_model(streamer, layer), adapter)
            view = _OnDevice(states, streamer.device)
            layer_calls = [c.of(i) for c in calls]
            applied[-1] = prune_layer_(
                layer, lp, plan, view, layer_calls, adapter, compensation, damp, selection
            )
            if i + 1 < n:
                for b, call in enumerate(calls):
                    states[b] = streamer.run(layer, states[b], call).to(streamer.host)
    plan = replace(plan, layers=tuple(applied))
    geometry = adapter.geometry(model)
    update_config_(model.config, geometry)
    check_pruned_model(model, plan)
    return plan, geometry
