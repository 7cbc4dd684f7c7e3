"""Taylor |w * grad| unit importance."""

import torch

from gqa_prune.importance.taylor import collect_taylor_scores
from gqa_prune.models.adapters import get_adapter

from conftest import tiny_model


def manual_group_scores(projections, r, d):
    """|w*g| summed over each group's q rows, k rows, v rows (+biases) and o columns."""

    def s(p):
        return (p.detach() * p.grad).abs()

    q, k, v, o = projections
    n_kv = k.out_features // d
    out = []
    for g in range(n_kv):
        q_rows, kv_rows = slice(g * r * d, (g + 1) * r * d), slice(g * d, (g + 1) * d)
        total = s(q.weight)[q_rows].sum() + s(k.weight)[kv_rows].sum()
        total += s(v.weight)[kv_rows].sum() + s(o.weight)[:, q_rows].sum()
        if q.bias is not None:
            total += s(q.bias)[q_rows].sum() + s(k.bias)[kv_rows].sum()
            total += s(v.bias)[kv_rows].sum()
        out.append(total)
    return torch.stack(out)


def test_taylor_matches_manual_sum_over_group_slices(kind):
    model = tiny_model(kind)
    ids = torch.randint(0, 128, (1, 16))
    scores = collect_taylor_scores(model, ids, batch_size=1, progress=False)
    # recompute the gradient by hand for the same batch
    model.zero_grad()
    for p in model.parameters():
        p.requires_grad_(True)
    model(input_ids=ids, labels=ids).loss.backward()
    adapter = get_adapter(model)
    attn = model.model.layers[1].self_attn
    projections = adapter.attention_projections(model.model.layers[1])
    expected = manual_group_scores(projections, attn.num_key_value_groups, attn.head_dim)
    torch.testing.assert_close(scores.groups[1], expected, rtol=1e-4, atol=1e-7)
    gate, up, down = adapter.mlp_projections(model.model.layers[2])
    ch = (
        (gate.weight * gate.weight.grad).abs().sum(1)
        + (up.weight * up.weight.grad).abs().sum(1)
        + (down.weight * down.weight.grad).abs().sum(0)
    ).detach()
    torch.testing.assert_close(scores.channels[2], ch, rtol=1e-4, atol=1e-7)


def test_one_backward_per_batch_and_fp32_accumulation():
    model = tiny_model("llama4")
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    ids = torch.randint(0, 128, (6, 16))
    total = collect_taylor_scores(model, ids, batch_size=2, progress=False)
    assert len(calls) == 3  # 6 samples / batch 2: one pass for the whole model per batch
    parts = [
        collect_taylor_scores(model, ids[i : i + 2], progress=False, batch_size=2)
        for i in range(0, 6, 2)
    ]
    summed = sum(p.groups[0] for p in parts)
    torch.testing.assert_close(total.groups[0], summed)
    assert all(g.dtype == torch.float32 and g.shape == (2,) for g in total.groups)
    assert all(c.shape == (96,) and torch.isfinite(c).all() for c in total.channels)
    # requires_grad flags are restored and no gradients are left behind
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
