"""Pruning equivalences: removing a unit == zeroing what it writes into the residual."""

import pytest
import torch

from gqa_prune.errors import GQAPruneError
from gqa_prune.models.adapters import get_adapter
from gqa_prune.plan import LayerPlan, PruningPlan
from gqa_prune.slicing import apply_plan_, prune_attention_by_gqa_groups, prune_mlp_channels

from conftest import tiny_model


def zero_group_outputs_(model, layer_idx: int, group: int) -> None:
    """The exact functional meaning of removing a group: its Q heads' o_proj columns are 0."""
    attn = model.model.layers[layer_idx].self_attn
    r, d = attn.num_key_value_groups, attn.head_dim
    with torch.no_grad():
        attn.o_proj.weight[:, group * r * d : (group + 1) * r * d] = 0


def zero_channel_outputs_(model, layer_idx: int, channels) -> None:
    with torch.no_grad():
        model.model.layers[layer_idx].mlp.down_proj.weight[:, list(channels)] = 0


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch).logits


def test_removing_a_group_equals_zeroing_it(kind, batch):
    model = tiny_model(kind)
    n_kv = model.config.num_key_value_heads
    drop = n_kv - 1
    zero_group_outputs_(model, 1, drop)
    expected = logits(model, batch)
    keep = [g for g in range(n_kv) if g != drop]
    prune_attention_by_gqa_groups(model.model.layers[1], keep, get_adapter(model))
    torch.testing.assert_close(logits(model, batch), expected, rtol=1e-5, atol=1e-5)


def test_removing_a_middle_group_keeps_mapping(batch):
    model = tiny_model("llama4")  # 8 Q / 2 KV: dropping group 0 must keep Q heads 4..7 with KV 1
    zero_group_outputs_(model, 0, 0)
    expected = logits(model, batch)
    prune_attention_by_gqa_groups(model.model.layers[0], [1])
    torch.testing.assert_close(logits(model, batch), expected, rtol=1e-5, atol=1e-5)


def test_removing_mlp_channels_equals_zeroing_down_columns(kind, batch):
    model = tiny_model(kind)
    drop = [0, 5, 17, 40, 95]
    zero_channel_outputs_(model, 2, drop)
    expected = logits(model, batch)
    keep = [c for c in range(model.config.intermediate_size) if c not in drop]
    prune_mlp_channels(model.model.layers[2], keep, get_adapter(model))
    torch.testing.assert_close(logits(model, batch), expected, rtol=1e-5, atol=1e-5)


def full_plan(model) -> PruningPlan:
    geom = get_adapter(model).geometry(model)
    layers = tuple(
        LayerPlan(i, tuple(range(kv)), tuple(range(m)))
        for i, (kv, m) in enumerate(zip(geom.kv_heads, geom.intermediate_sizes))
    )
    return PruningPlan(layers, geom.queries_per_kv, geom.head_dim)


def test_pruning_nothing_is_identity(kind, batch):
    model = tiny_model(kind)
    expected = logits(model, batch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_plan_(model, full_plan(model))
    torch.testing.assert_close(logits(model, batch), expected, rtol=0, atol=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_plan_keeps_ratio_shapes_and_counts(kind, batch):
    model = tiny_model(kind)
    geom = get_adapter(model).geometry(model)
    n_kv = geom.kv_heads[0]
    plan = PruningPlan(
        tuple(
            LayerPlan(i, tuple(range(max(1, n_kv - i))), tuple(range(0, 96, i + 1)))
            for i in range(geom.num_layers)
        ),
        geom.queries_per_kv,
        geom.head_dim,
    )
    after = apply_plan_(model, plan)
    r = geom.queries_per_kv
    adapter = get_adapter(model)
    for i, lp in enumerate(plan.layers):
        q, k, _, _ = adapter.attention_projections(model.model.layers[i])
        assert after.kv_heads[i] == len(lp.keep_kv_groups)
        assert q.out_features == len(lp.keep_kv_groups) * r * geom.head_dim
        assert q.out_features // k.out_features == r
        down = adapter.mlp_projections(model.model.layers[i])[2]
        assert down.in_features == len(lp.keep_mlp_channels)
    removed = geom.total_params - after.total_params
    expected_removed = sum(
        (kv - len(lp.keep_kv_groups)) * geom.params_per_group
        + (m - len(lp.keep_mlp_channels)) * geom.params_per_channel
        for lp, kv, m in zip(plan.layers, geom.kv_heads, geom.intermediate_sizes)
    )
    assert removed == expected_removed
    assert model.config.layer_num_key_value_heads == list(after.kv_heads)
    assert torch.isfinite(logits(model, batch)).all()


def test_bad_indices_are_refused():
    model = tiny_model("llama4")
    with pytest.raises(GQAPruneError, match="KV group"):
        prune_attention_by_gqa_groups(model.model.layers[0], [0, 5])
    with pytest.raises(GQAPruneError, match="at least one"):
        prune_attention_by_gqa_groups(model.model.layers[0], [])
