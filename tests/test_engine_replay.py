"""The engine's cheaper passes: a cut block's outputs are replayed from its recorded
projection inputs instead of recomputed (same weights, fewer block computations), and Gram
matrices are accumulated on their lower block triangle only."""

from contextlib import contextmanager

import pytest
import torch

from gqa_prune import GQAPruneError
from gqa_prune.analysis.decoder_stack import Replay
from gqa_prune.compensation import prune_sequential_
from gqa_prune.compensation import sequential as sequential_mod
from gqa_prune.compensation.stats import InputStats
from gqa_prune.models.adapters import get_adapter
from gqa_prune.plan import LayerPlan, PruningPlan

from conftest import KINDS, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(11))


def mixed_plan(model) -> PruningPlan:
    """Layer 0 loses a group and channels, 1 only channels, 2 only a group, 3 its whole
    attention and channels (4 layers)."""
    geometry = get_adapter(model).geometry(model)
    n_kv = geometry.kv_heads[0]
    every = tuple(range(96))
    some = tuple(range(0, 96, 3))
    fewer = tuple(range(1, n_kv))
    layers = (
        LayerPlan(0, fewer, some),
        LayerPlan(1, tuple(range(n_kv)), some),
        LayerPlan(2, fewer, every),
        LayerPlan(3, (), some),
    )
    return PruningPlan(layers, geometry.queries_per_kv, geometry.head_dim)


@contextmanager
def _compute_everything(layer, adapter, known):
    yield  # the blocks compute as before replay existed


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "compensation, selection, target",
    [("lstsq", "score", "local"), ("lstsq", "repair", "dense"), ("bias", "score", "local")],
)
def test_replay_gives_the_weights_of_recomputing(
    monkeypatch, kind, compensation, selection, target
):
    dense = tiny_model(kind, num_hidden_layers=4)
    plan = mixed_plan(dense)
    replayed, recomputed = tiny_model(kind, num_hidden_layers=4), dense
    plan_a, _ = prune_sequential_(
        replayed, plan, IDS, compensation, 0.1, batch_size=3, selection=selection, target=target
    )
    monkeypatch.setattr(sequential_mod, "replaying", _compute_everything)
    plan_b, _ = prune_sequential_(
        recomputed, plan, IDS, compensation, 0.1, batch_size=3, selection=selection, target=target
    )
    assert plan_a == plan_b
    a, b = replayed.state_dict(), recomputed.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(replayed(IDS).logits, recomputed(IDS).logits)


def count_calls(model) -> dict[str, int]:
    """Per-name call counters on every layer, its q_proj, MLP, gate_proj and down_proj."""
    adapter = get_adapter(model)
    calls = dict.fromkeys(("layer", "q", "mlp", "gate", "down"), 0)

    def count(name):
        def hook(*_):
            calls[name] += 1

        return hook

    for layer in adapter.decoder_layers(model):
        gate, _, down = adapter.mlp_projections(layer)
        watched = (layer, adapter.attention_projections(layer)[0], adapter.mlp(layer), gate, down)
        for name, module in zip(calls, watched, strict=True):
            module.register_forward_pre_hook(count(name))
    return calls


def test_every_layer_cut_both_ways_computes_each_block_once():
    model = tiny_model("llama4")
    geometry = get_adapter(model).geometry(model)
    plan = PruningPlan(
        tuple(LayerPlan(i, (0,), tuple(range(0, 96, 2))) for i in range(3)),
        geometry.queries_per_kv,
        geometry.head_dim,
    )
    calls = count_calls(model)
    prune_sequential_(model, plan, IDS, "lstsq", 0.1, batch_size=4)
    batches, n = 2, 3
    # capture runs no layer; per layer pass 1 (stops at o_proj), pass 2 (replays the pruned
    # attention, stops at down_proj), pass 3 (replays both blocks) except after the last
    assert calls["layer"] == batches * (3 * n - 1)
    assert calls["q"] == batches * n  # attention computes in pass 1 only
    assert calls["mlp"] == calls["gate"] == batches * n  # the MLP in pass 2 only
    # down_proj: reached (and stopped) in pass 2, then run once on the recorded inputs
    assert calls["down"] == batches * 2 * n


def test_blocks_compute_once_per_layer_and_batch():
    model = tiny_model("llama4", num_hidden_layers=4)
    calls = count_calls(model)
    prune_sequential_(model, mixed_plan(model), IDS, "lstsq", 0.1, batch_size=4)
    batches = 2
    # layer 0: passes 1, 2, 3; layer 1 (MLP only): 2, 3; layer 2 (attention only): 1, 3;
    # layer 3 (attention removed, nothing to refit there): 2 only, the last layer has no 3
    assert calls["layer"] == batches * (3 + 2 + 2 + 1)
    # q/k/v once per batch in layers 0-2: pass 1 where attention is cut, else pass 2 (layer
    # 1); layer 3's attention is removed before any pass needs it
    assert calls["q"] == batches * 3
    # the MLP computes in pass 2 of the layers that cut it and in pass 3 of layer 2 only
    assert calls["mlp"] == calls["gate"] == batches * 4


def test_replay_refuses_a_call_out_of_order():
    stand_in = Replay([torch.zeros(2, 3, 4)], pair=True)
    out, weights = stand_in(torch.ones(2, 3, 4))
    assert weights is None and torch.equal(out, torch.zeros(2, 3, 4))
    with pytest.raises(GQAPruneError, match="more than 1 times"):
        stand_in(torch.ones(2, 3, 4))
    with pytest.raises(GQAPruneError, match="shape"):
        Replay([torch.zeros(2, 3, 4)], pair=False)(hidden_states=torch.ones(1, 3, 4))


def test_blocks_replaced_restores_the_blocks_on_error():
    model = tiny_model("llama4")
    adapter = get_adapter(model)
    layer = adapter.decoder_layers(model)[0]
    attention, mlp = adapter.attention(layer), adapter.mlp(layer)
    stand_in = torch.nn.Identity()
    with pytest.raises(RuntimeError), adapter.blocks_replaced(layer, stand_in, stand_in):
        assert adapter.attention(layer) is stand_in and adapter.mlp(layer) is stand_in
        raise RuntimeError
    assert adapter.attention(layer) is attention and adapter.mlp(layer) is mlp


@pytest.mark.parametrize("n_in, block", [(7, 3), (9, 3), (5, 256)])
@pytest.mark.parametrize("weighted", [False, True])
def test_gram_from_lower_blocks_is_the_full_product(monkeypatch, n_in, block, weighted):
    from gqa_prune.compensation import stats as stats_mod

    monkeypatch.setattr(stats_mod, "GRAM_BLOCK", block)
    g = torch.Generator().manual_seed(n_in)
    xs = [torch.randn(2, 4, n_in, generator=g) for _ in range(3)]
    ws = [torch.rand(2, 4, generator=g) for _ in range(3)] if weighted else None
    linear = torch.nn.Linear(n_in, 2)
    stats = InputStats(linear, gram=True, weights=ws, keep_on="cpu")
    seen = []
    for i, x in enumerate(xs):
        linear(x)
        flat = torch.cat([t.reshape(-1, n_in) for t in xs[: i + 1]])
        w = (
            torch.ones(flat.shape[0])
            if ws is None
            else torch.cat([t.reshape(-1) for t in ws[: i + 1]])
        )
        expected = flat.T @ (flat * w[:, None])
        torch.testing.assert_close(stats.gram, expected)  # read between calls, then go on
        seen.append(stats.gram.clone())
    assert not torch.equal(seen[0], seen[-1])
    assert [torch.equal(a, b) for a, b in zip(stats.inputs, xs, strict=True)] == [True] * 3
    stats.remove()


def test_memory_estimate_covers_the_engine_recordings(monkeypatch):
    from gqa_prune.streaming.pipeline import plan_memory

    model = tiny_model("llama4", num_hidden_layers=4)
    tokens = IDS.numel()
    # the largest recording of any layer: kept projection inputs + replayed block outputs
    peak = {"now": 0, "max": 0}
    original_call, original_replayed = InputStats.__call__, sequential_mod._replayed

    def call(self, module, args):
        original_call(self, module, args)
        if self.keep_on is not None:
            peak["now"] += args[0].numel() * args[0].element_size()
            peak["max"] = max(peak["max"], peak["now"])

    def replayed(linear, inputs, keep):
        out = original_replayed(linear, inputs, keep)
        peak["now"] += sum(t.numel() * t.element_size() for t in out)
        peak["max"] = max(peak["max"], peak["now"])
        return out

    original_layer = sequential_mod.prune_layer_

    def layer(*args, **kwargs):
        peak["now"] = 0  # the previous layer's recordings are gone by now
        return original_layer(*args, **kwargs)

    def plan(**kw):
        return plan_memory(model, 4, 16, "taylor", "lstsq", selection="repair", **kw)

    base, with_tokens = plan(), plan(calibration_tokens=tokens)
    hidden = 48
    held = with_tokens.dense - base.dense
    assert with_tokens.resident == base.resident  # streaming on a device: recordings on the host
    monkeypatch.setattr(InputStats, "__call__", call)
    monkeypatch.setattr(sequential_mod, "_replayed", replayed)
    monkeypatch.setattr(sequential_mod, "prune_layer_", layer)
    prune_sequential_(model, mixed_plan(model), IDS, "lstsq", 0.1, batch_size=4)
    stream = tokens * hidden * 4  # fp32 boundary states
    assert 0 < peak["max"] and stream + peak["max"] <= held
    none = plan_memory(model, 4, 16, "taylor", "none", calibration_tokens=tokens).dense
    assert none - plan_memory(model, 4, 16, "taylor", "none").dense == stream
    resident = plan(calibration_tokens=tokens, layers_in_device_memory=True).resident
    assert resident - plan(layers_in_device_memory=True).resident == held
