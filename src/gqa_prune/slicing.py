"""The only code that changes weights: slicing whole GQA groups and MLP channels.

Query head ``h`` reads KV head ``h // r`` (``r`` = Q heads per KV head, as in
``repeat_kv``), so keeping KV head ``g`` keeps query heads ``[g*r, (g+1)*r)``; in the
weights, q rows / o columns ``[g*r*d, (g+1)*r*d)`` and k/v rows ``[g*d, (g+1)*d)``
(``d`` = head_dim). Kept groups stay in their original order, so the Q:KV mapping of
the sliced layer is again ``h // r``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gqa_prune.errors import GQAPruneError
from gqa_prune.models.adapters import ADAPTERS, ArchitectureAdapter, get_adapter
from gqa_prune.models.geometry import GQAGeometry, update_config_
from gqa_prune.plan import LayerPlan, PruningPlan

_DEFAULT_ADAPTER = ADAPTERS["llama"]


def _slice_linear_(linear: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep ``index`` along ``dim`` of ``linear.weight`` (0 = outputs, 1 = inputs), in place."""
    weight = linear.weight
    index = index.to(weight.device)
    new_weight = weight.data.index_select(dim, index).clone()
    linear.weight = nn.Parameter(new_weight, requires_grad=weight.requires_grad)
    if dim == 0:
        linear.out_features = new_weight.shape[0]
        if linear.bias is not None:
            bias = linear.bias.data.index_select(0, index).clone()
            linear.bias = nn.Parameter(bias, requires_grad=linear.bias.requires_grad)
    else:
        linear.in_features = new_weight.shape[1]


def group_rows(groups: Sequence[int], width: int) -> torch.Tensor:
    """Row indices of the listed groups when each group spans ``width`` consecutive rows."""
    g = torch.as_tensor(list(groups), dtype=torch.long)
    return (g[:, None] * width + torch.arange(width)[None, :]).reshape(-1)


def _check_indices(keep: Sequence[int], size: int, what: str) -> None:
    if len(set(keep)) != len(keep) or any(i < 0 or i >= size for i in keep):
        raise GQAPruneError(f"{what} indices {list(keep)} must be distinct and in [0, {size})")


def prune_attention_by_gqa_groups(
    layer: nn.Module,
    keep_kv_indices: Sequence[int],
    adapter: ArchitectureAdapter = _DEFAULT_ADAPTER,
    allow_removal: bool = False,
) -> None:
    """Keep only the listed GQA groups of one decoder layer's attention, in place.

    Slices q/k/v rows (and their biases) and o_proj input columns so that each kept KV
    head keeps exactly its own query heads. The Q:KV ratio stays unchanged.

    An empty ``keep_kv_indices`` removes the attention block entirely (only when
    ``allow_removal``): it is replaced by a module that adds the old o_proj bias (if any)
    and nothing else, exactly what zeroing every o_proj column would give.

    Args:
        layer: a decoder layer.
        keep_kv_indices: KV-head (group) indices to keep.
        adapter: names of the projections (Llama-style by default).
        allow_removal: accept an empty ``keep_kv_indices``.
    """
    attn = adapter.attention(layer)
    q, k, v, o = adapter.attention_projections(layer)
    head_dim = int(attn.head_dim)
    ratio = q.out_features // k.out_features
    n_kv = k.out_features // head_dim
    keep = sorted(int(i) for i in keep_kv_indices)
    _check_indices(keep, n_kv, "KV group")
    if not keep:
        if not allow_removal:
            raise GQAPruneError(
                "keep at least one KV group per layer (got an empty list); allow removing "
                "whole attention blocks with --allow_attention_removal"
            )
        adapter.remove_attention_(layer, None if o.bias is None else o.bias.data)
        return
    q_rows = group_rows(keep, ratio * head_dim)
    kv_rows = group_rows(keep, head_dim)
    _slice_linear_(q, q_rows, 0)
    _slice_linear_(k, kv_rows, 0)
    _slice_linear_(v, kv_rows, 0)
    _slice_linear_(o, q_rows, 1)
    adapter.set_head_counts_(attn, len(keep) * ratio, len(keep))


def prune_mlp_channels(
    layer: nn.Module,
    keep_channels: Sequence[int],
    adapter: ArchitectureAdapter = _DEFAULT_ADAPTER,
) -> None:
    """Keep only the listed MLP channels (gate/up rows, down columns) of one layer, in place."""
    gate, up, down = adapter.mlp_projections(layer)
    keep = sorted(int(i) for i in keep_channels)
    _check_indices(keep, gate.out_features, "MLP channel")
    if not keep:
        raise GQAPruneError("keep at least one MLP channel per layer (got an empty list)")
    index = torch.as_tensor(keep, dtype=torch.long)
    _slice_linear_(gate, index, 0)
    _slice_linear_(up, index, 0)
    _slice_linear_(down, index, 1)
    mlp = adapter.mlp(layer)
    if isinstance(getattr(mlp, "intermediate_size", None), int):
        mlp.intermediate_size = len(keep)


def apply_plan_(model: nn.Module, plan: PruningPlan) -> GQAGeometry:
    """Slice every layer of ``model`` to ``plan``, update its config, check the result.

    Returns:
        The geometry of the pruned model.
    """
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    if len(plan.layers) != len(layers):
        raise GQAPruneError(
            f"pruning plan has {len(plan.layers)} layers but the model has {len(layers)}"
        )
    for lp in plan.layers:
        slice_layer_(layers[lp.layer_idx], lp, plan, adapter)
    geometry = adapter.geometry(model)
    update_config_(model.config, geometry)
    check_pruned_model(model, plan)
    return geometry


def slice_layer_(
    layer: nn.Module, lp: LayerPlan, plan: PruningPlan, adapter: ArchitectureAdapter
) -> None:
    """Slice one decoder layer to its plan (attention groups, then MLP channels), in place."""
    if attention_cut(layer, lp, plan, adapter):
        prune_attention_by_gqa_groups(layer, lp.keep_kv_groups, adapter, allow_removal=True)
    if len(lp.keep_mlp_channels) != adapter.mlp_projections(layer)[0].out_features:
        prune_mlp_channels(layer, lp.keep_mlp_channels, adapter)


def attention_cut(
    layer: nn.Module, lp: LayerPlan, plan: PruningPlan, adapter: ArchitectureAdapter
) -> bool:
    """Whether ``lp`` removes any KV group of ``layer`` (False once its attention is gone)."""
    if not adapter.has_attention(layer):
        if lp.keep_kv_groups:
            raise GQAPruneError(
                f"layer {lp.layer_idx} has no attention block left, but the plan keeps KV "
                f"groups {list(lp.keep_kv_groups)}"
            )
        return False
    k = adapter.attention_projections(layer)[1]
    return len(lp.keep_kv_groups) != k.out_features // plan.head_dim


def check_pruned_model(model: nn.Module, plan: PruningPlan) -> None:
    """Raise if any layer's shapes disagree with the plan or the Q:KV ratio changed."""
    adapter = get_adapter(model)
    for lp, layer in zip(plan.layers, adapter.decoder_layers(model), strict=True):
        n_kv = len(lp.keep_kv_groups)
        expected_q = n_kv * plan.queries_per_kv * plan.head_dim
        if adapter.has_attention(layer):
            q, k, v, o = adapter.attention_projections(layer)
            shapes = (q.out_features, k.out_features, v.out_features, o.in_features)
        else:
            shapes = (0, 0, 0, 0)
        expected = (expected_q, n_kv * plan.head_dim, n_kv * plan.head_dim, expected_q)
        gate, up, down = adapter.mlp_projections(layer)
        n_ch = len(lp.keep_mlp_channels)
        mlp_ok = gate.out_features == up.out_features == down.in_features == n_ch
        if shapes != expected or not mlp_ok:
            raise RuntimeError(
                f"layer {lp.layer_idx} was not sliced to the plan: q/k/v/o_in={shapes} "
                f"(expected {expected}), mlp={gate.out_features}/{up.out_features}/"
                f"{down.in_features} (expected {n_ch})"
            )
