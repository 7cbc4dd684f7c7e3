"""Unit-importance criteria: taylor, taylor2, magnitude, wanda, random, and their registry."""

import math

import pytest
import torch

from gqa_prune.errors import GQAPruneError
from gqa_prune.importance.base import AGGREGATIONS
from gqa_prune.importance.compute import CRITERIA, compute_unit_scores
from gqa_prune.importance.registry import SCORERS
from gqa_prune.importance.taylor import (
    collect_taylor_scores,
    taylor_first_order,
    taylor_second_order,
)

from conftest import tiny_model


def _ids(n=2, seq=8, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (n, seq), generator=gen)


def _group_slices(attn, g):
    r, d = attn.num_key_value_groups, attn.head_dim
    return slice(g * r * d, (g + 1) * r * d), slice(g * d, (g + 1) * d)


def _group_parts(attn, g, fn):
    """fn(tensor, kind) applied to every parameter slice group g owns, flattened."""
    q_rows, kv_rows = _group_slices(attn, g)
    parts = [
        fn(attn.q_proj.weight, "w")[q_rows],
        fn(attn.k_proj.weight, "w")[kv_rows],
        fn(attn.v_proj.weight, "w")[kv_rows],
        fn(attn.o_proj.weight, "w")[:, q_rows],
    ]
    if attn.q_proj.bias is not None:
        parts += [
            fn(attn.q_proj.bias, "b")[q_rows],
            fn(attn.k_proj.bias, "b")[kv_rows],
            fn(attn.v_proj.bias, "b")[kv_rows],
        ]
    return torch.cat([p.detach().reshape(-1) for p in parts])


def _channel_parts(mlp, c, fn):
    parts = [
        fn(mlp.gate_proj.weight, "w")[c],
        fn(mlp.up_proj.weight, "w")[c],
        fn(mlp.down_proj.weight, "w")[:, c],
    ]
    return torch.cat([p.detach().reshape(-1) for p in parts])


# --------------------------------------------------------------------------- all criteria
@pytest.mark.parametrize("model_kind", ["llama4", "qwen2", "gemma2"])
@pytest.mark.parametrize("criterion", CRITERIA)
def test_every_criterion_and_aggregation_gives_finite_scores_per_unit(model_kind, criterion):
    model = tiny_model(model_kind)
    cfg = model.config
    for aggregation in AGGREGATIONS:
        scores = compute_unit_scores(
            model, _ids(), criterion, aggregation, batch_size=1, progress=False
        )
        assert len(scores.groups) == len(scores.channels) == cfg.num_hidden_layers
        for g, c in zip(scores.groups, scores.channels, strict=True):
            assert g.shape == (cfg.num_key_value_heads,) and c.shape == (cfg.intermediate_size,)
            assert g.dtype == c.dtype == torch.float32
            assert g.device.type == c.device.type == "cpu"
            assert torch.isfinite(g).all() and torch.isfinite(c).all()
            assert (g >= 0).all() and (c >= 0).all()
            # a real score separates units; all-equal (e.g. all zero) would be useless
            assert g.unique().numel() == g.numel() and c.unique().numel() == c.numel()


def test_registry_holds_exactly_the_declared_criteria():
    assert CRITERIA == ("taylor", "taylor2", "magnitude", "wanda", "random")
    assert set(SCORERS) == set(CRITERIA)
    assert {n for n, s in SCORERS.items() if s.needs_data} == {"taylor", "taylor2", "wanda"}


def test_unknown_criterion_lists_valid_names():
    model = tiny_model("llama4")
    with pytest.raises(GQAPruneError, match="unknown importance criterion 'snip'") as err:
        compute_unit_scores(model, _ids(), "snip")
    for name in CRITERIA:
        assert name in str(err.value)


@pytest.mark.parametrize("criterion", CRITERIA)
def test_unknown_aggregation_lists_valid_names(criterion):
    model = tiny_model("llama4")
    with pytest.raises(GQAPruneError, match="unknown aggregation 'median'") as err:
        compute_unit_scores(model, _ids(), criterion, aggregation="median", progress=False)
    assert all(name in str(err.value) for name in AGGREGATIONS)


@pytest.mark.parametrize("criterion", ["taylor", "taylor2", "wanda"])
@pytest.mark.parametrize("ids", [None, torch.empty(0, 8, dtype=torch.long)])
def test_data_criteria_refuse_missing_or_empty_input(criterion, ids):
    model = tiny_model("llama4")
    with pytest.raises(GQAPruneError, match="needs calibration tokens"):
        compute_unit_scores(model, ids, criterion, progress=False)


@pytest.mark.parametrize("criterion", ["magnitude", "random"])
def test_data_free_criteria_accept_no_input(criterion):
    scores = compute_unit_scores(tiny_model("llama4"), None, criterion)
    assert len(scores.groups) == 3


def test_bad_batch_size_is_a_user_error():
    with pytest.raises(GQAPruneError, match="batch_size must be an integer >= 1, got 0"):
        compute_unit_scores(tiny_model("llama4"), _ids(), "wanda", batch_size=0)


def test_non_finite_scores_name_the_step():
    model = tiny_model("llama4")
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[5, 0] = float("nan")
    with pytest.raises(GQAPruneError, match="magnitude importance: non-finite .* layer 2"):
        compute_unit_scores(model, None, "magnitude")


# ---------------------------------------------------------------------------- magnitude
@pytest.mark.parametrize("model_kind", ["llama4", "qwen2"])
def test_magnitude_matches_hand_computation(model_kind):
    model = tiny_model(model_kind)
    attn = model.model.layers[1].self_attn
    mlp = model.model.layers[2].mlp
    group = _group_parts(attn, 1, lambda p, k: p)  # every parameter group 1 owns
    channel = _channel_parts(mlp, 7, lambda p, k: p)
    assert group.numel() == (2 * attn.num_key_value_groups + 2) * 8 * 48 + (
        (attn.num_key_value_groups + 2) * 8 if attn.q_proj.bias is not None else 0
    )
    expected = {
        "sum": (group.pow(2).sum().sqrt(), channel.pow(2).sum().sqrt()),
        "mean": (group.pow(2).mean().sqrt(), channel.pow(2).mean().sqrt()),
        "max": (group.abs().max(), channel.abs().max()),
    }
    for aggregation, (g_exp, c_exp) in expected.items():
        scores = compute_unit_scores(model, None, "magnitude", aggregation)
        torch.testing.assert_close(scores.groups[1][1], g_exp)
        torch.testing.assert_close(scores.channels[2][7], c_exp)
    # sum is the plain L2 norm of the unit: the whole channel as one vector
    scores = compute_unit_scores(model, None, "magnitude")
    torch.testing.assert_close(scores.channels[2][7], torch.linalg.vector_norm(channel))


# -------------------------------------------------------------------------------- wanda
def _captured_inputs(model, ids, modules):
    """Inputs of each module over all samples (one forward per sample), rows = tokens."""
    seen = {m: [] for m in modules}
    handles = [
        m.register_forward_hook(
            lambda mod, args, out: seen[mod].append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for m in modules
    ]
    try:
        with torch.no_grad():
            for sample in ids:
                model(input_ids=sample[None])
    finally:
        for h in handles:
            h.remove()
    return {m: torch.cat(rows) for m, rows in seen.items()}


@pytest.mark.parametrize("model_kind", ["llama4", "qwen2"])
def test_wanda_matches_hand_computation(model_kind):
    model = tiny_model(model_kind)
    ids = _ids(n=3, seq=10)  # three batches of one: norms must accumulate across batches
    attn = model.model.layers[1].self_attn
    mlp = model.model.layers[2].mlp
    x = _captured_inputs(model, ids, [attn.q_proj, attn.o_proj, mlp.gate_proj, mlp.down_proj])
    n_tokens = ids.numel()
    assert x[mlp.down_proj].shape == (n_tokens, 96)  # the MLP activation, one column per channel

    # ||X_j||_2 over all calibration tokens
    norm = {m: rows.pow(2).sum(0).sqrt() for m, rows in x.items()}
    hidden_in, o_in = norm[attn.q_proj], norm[attn.o_proj]
    mlp_in, down_in = norm[mlp.gate_proj], norm[mlp.down_proj]

    c = 11
    channel = (
        (mlp.gate_proj.weight[c].abs() * mlp_in).sum()
        + (mlp.up_proj.weight[c].abs() * mlp_in).sum()
        + mlp.down_proj.weight[:, c].abs().sum() * down_in[c]
    ).detach()

    def element(p, kind):
        if kind == "b":
            return p.abs() * math.sqrt(n_tokens)  # bias = weight on a constant-1 input
        if p is attn.o_proj.weight:
            return p.abs() * o_in[None, :]
        return p.abs() * hidden_in[None, :]

    group = _group_parts(attn, 0, element)

    scores = compute_unit_scores(model, ids, "wanda", batch_size=1, progress=False)
    torch.testing.assert_close(scores.channels[2][c], channel, rtol=1e-5, atol=0)
    torch.testing.assert_close(scores.groups[1][0], group.sum(), rtol=1e-5, atol=0)
    # batching does not change the accumulated norms
    batched = compute_unit_scores(model, ids, "wanda", batch_size=2, progress=False)
    torch.testing.assert_close(batched.groups[1], scores.groups[1], rtol=1e-5, atol=0)
    # max: the largest element score of the unit
    by_max = compute_unit_scores(model, ids, "wanda", aggregation="max", progress=False)
    torch.testing.assert_close(by_max.groups[1][0], group.max(), rtol=1e-5, atol=0)


def _pre_hook_count(model):
    return sum(len(m._forward_pre_hooks) for m in model.modules())


def test_wanda_leaves_no_hooks_behind_also_when_a_forward_raises():
    model = tiny_model("llama4")
    assert _pre_hook_count(model) == 0
    compute_unit_scores(model, _ids(), "wanda", progress=False)
    assert _pre_hook_count(model) == 0

    seen_during = []

    def boom(module, args, output):
        seen_during.append(_pre_hook_count(model))
        raise RuntimeError("boom in layer 1")

    handle = model.model.layers[1].mlp.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom in layer 1"):
        compute_unit_scores(model, _ids(), "wanda", progress=False)
    handle.remove()
    assert seen_during == [3 * 7]  # the collector's hooks were live when it raised ...
    assert _pre_hook_count(model) == 0  # ... and are gone afterwards
    # the model still works and wanda can run again
    compute_unit_scores(model, _ids(), "wanda", progress=False)
    assert _pre_hook_count(model) == 0


# ------------------------------------------------------------------------------- random
def test_random_is_seeded():
    model = tiny_model("llama4")
    a = compute_unit_scores(model, None, "random", seed=7)
    b = compute_unit_scores(model, None, "random", seed=7)
    c = compute_unit_scores(model, None, "random", seed=8)
    for x, y in zip(a.groups + a.channels, b.groups + b.channels, strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(torch.cat(a.channels), torch.cat(c.channels))
    assert not torch.equal(torch.cat(a.groups), torch.cat(c.groups))
    # independent of the global RNG state
    torch.manual_seed(123)
    d = compute_unit_scores(model, None, "random", seed=7)
    assert torch.equal(torch.cat(a.channels), torch.cat(d.channels))


# ------------------------------------------------------------------------ taylor/taylor2
def test_registry_taylor_is_collect_taylor_scores():
    model = tiny_model("qwen2")
    ids = _ids()
    for criterion, second in (("taylor", False), ("taylor2", True)):
        via_registry = compute_unit_scores(model, ids, criterion, "mean", 1, progress=False)
        direct = collect_taylor_scores(model, ids, 1, second, "mean", progress=False)
        torch.testing.assert_close(via_registry.groups, direct.groups)
        torch.testing.assert_close(via_registry.channels, direct.channels)


def test_taylor2_adds_half_the_squared_first_order_term():
    model = tiny_model("llama4")
    ids = _ids(n=1, seq=16)
    t1 = compute_unit_scores(model, ids, "taylor", progress=False)
    t2 = compute_unit_scores(model, ids, "taylor2", progress=False)
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    attn = model.model.layers[0].self_attn
    mlp = model.model.layers[1].mlp

    def wg(p, kind):
        return p.detach() * p.grad

    extra_group = 0.5 * _group_parts(attn, 1, wg).pow(2).sum()
    extra_channel = 0.5 * _channel_parts(mlp, 3, wg).pow(2).sum()
    assert (t2.groups[0] > t1.groups[0]).all() and (t2.channels[1] > t1.channels[1]).all()
    torch.testing.assert_close(t2.groups[0][1] - t1.groups[0][1], extra_group, rtol=1e-2, atol=0)
    torch.testing.assert_close(
        t2.channels[1][3] - t1.channels[1][3], extra_channel, rtol=1e-2, atol=0
    )


def test_taylor2_reduces_to_taylor_for_small_gradients():
    w = torch.randn(64, 32)
    g = torch.randn(64, 32)
    big = taylor_second_order(w, g) - taylor_first_order(w, g)
    torch.testing.assert_close(big, 0.5 * (w * g).pow(2))
    assert big.max() > 0.1
    tiny = g * 1e-6
    torch.testing.assert_close(
        taylor_second_order(w, tiny), taylor_first_order(w, tiny), rtol=1e-5, atol=0
    )
    # end to end: a near-zero lm_head makes every gradient tiny, and taylor2 -> taylor
    model = tiny_model("llama4")
    ids = _ids()
    normal = [compute_unit_scores(model, ids, c, progress=False) for c in ("taylor", "taylor2")]
    with torch.no_grad():
        model.lm_head.weight.mul_(1e-4)
    small = [compute_unit_scores(model, ids, c, progress=False) for c in ("taylor", "taylor2")]
    ratio_normal = (normal[1].groups[0] / normal[0].groups[0] - 1).max()
    ratio_small = (small[1].groups[0] / small[0].groups[0] - 1).max()
    assert ratio_normal > 1e-4
    assert 0 < ratio_small < 1e-6
