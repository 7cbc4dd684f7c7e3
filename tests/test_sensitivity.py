"""Measured sensitivity (``--pruning_mode sensitivity``)."""

import copy

import pytest
import torch

from gqa_prune import AllocationConfig, GQAPruneError, prune_model_
from gqa_prune import pipeline as pipeline_mod
from gqa_prune.compensation import ResidentLayers, repair_sensitivity
from gqa_prune.compensation.selection import greedy_removal, removal_error, ridge_lambda
from gqa_prune.compensation.sensitivity import _gain, curve_costs
from gqa_prune.models.adapters import get_adapter
from gqa_prune.streaming import LayerStreamer, StreamingConfig

from conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(5))
DAMP = 0.1


def correlated(n_in: int, seed: int, out: int = 5, tokens: int = 48):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n_in, generator=g, dtype=torch.float64)
    x = x @ (torch.eye(n_in) + torch.randn(n_in, n_in, generator=g, dtype=torch.float64) / 3)
    return x.T @ x, torch.randn(out, n_in, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("width", [1, 3])
@pytest.mark.parametrize("seed", range(2))
def test_greedy_increments_are_the_error_curve(width, seed):
    gram, w = correlated(6 * width, seed)
    trace = greedy_removal(w, gram, 6, DAMP, width, chunk=1)
    assert len(trace.increments) == len(trace.removed) == 6
    assert sum(trace.increments) == pytest.approx(trace.error, rel=1e-9)
    lam = ridge_lambda(gram, DAMP)
    previous = 0.0
    for k in range(1, 6):  # E(first k removed) - E(first k-1), each by the closed form
        cols = [u * width + c for u in trace.removed[:k] for c in range(width)]
        now = removal_error(w, gram, cols, lam)
        assert trace.increments[k - 1] == pytest.approx(now - previous, rel=1e-6, abs=1e-9)
        assert trace.increments[k - 1] >= -1e-9  # removing more never lowers the optimum
        previous = now
    chunked = greedy_removal(w, gram, 6, DAMP, width, chunk=4)
    assert len(chunked.increments) == 6
    assert chunked.increments[0] == chunked.increments[3]  # a chunk's rise is shared
    assert sum(chunked.increments) == pytest.approx(chunked.error, rel=1e-9)


def test_curve_costs_are_the_running_maximum_in_removal_order():
    costs = curve_costs([1.0, 3.0, 2.0, 2.0, 5.0, -1.0], [4, 0, 5, 1, 2, 3], 0.5)
    assert costs.dtype == torch.float64
    along = costs[[4, 0, 5, 1, 2, 3]]
    assert along[0] == 0.5 and along[1] == 1.5 and along[4] == 2.5
    assert torch.all(along[1:] > along[:-1])  # strict: sorting gives back the order
    assert along[2] == pytest.approx(1.5) and along[5] == pytest.approx(2.5)
    assert torch.argsort(costs).tolist() == [4, 0, 5, 1, 2, 3]


def test_gain_of_a_projection_added_straight_to_the_stream_is_one():
    model = tiny_model("llama4")
    walk = ResidentLayers(model)
    states, calls = walk.capture([IDS[:4]])
    adapter, layer = walk.adapter, walk.layers[0]
    call = calls[0].of(0)
    reference = walk.run(layer, states[0], call).float()
    down = adapter.mlp_projections(layer)[2]
    assert _gain(walk, layer, down, states[0], call, reference, 0) == pytest.approx(1.0, rel=1e-3)
    gemma = tiny_model("gemma3")  # sandwich norms rescale what reaches the stream
    walk = ResidentLayers(gemma)
    states, calls = walk.capture([IDS[:4]])
    layer, call = walk.layers[0], calls[0].of(0)
    reference = walk.run(layer, states[0], call).float()
    down = walk.adapter.mlp_projections(layer)[2]
    gain = _gain(walk, layer, down, states[0], call, reference, 0)
    assert gain > 0 and abs(gain - 1) > 0.05


@pytest.mark.parametrize("kind", ["llama4", "qwen3", "gemma3"])
def test_repair_sensitivity_shapes_determinism_and_streaming(kind):
    dense = tiny_model(kind)
    before = [p.detach().clone() for p in dense.parameters()]
    a = repair_sensitivity(ResidentLayers(dense), IDS, DAMP, batch_size=4)
    assert all(torch.equal(p, q) for p, q in zip(before, dense.parameters(), strict=True))
    geometry = get_adapter(dense).geometry(dense)
    assert [g.numel() for g in a.groups] == list(geometry.kv_heads)
    assert [c.numel() for c in a.channels] == list(geometry.intermediate_sizes)
    assert all(torch.isfinite(t).all() and (t >= 0).all() for t in a.groups + a.channels)
    assert all(t.unique().numel() == t.numel() for t in a.groups + a.channels)
    b = repair_sensitivity(ResidentLayers(dense), IDS, DAMP, batch_size=4)
    assert all(torch.equal(x, y) for x, y in zip(a.groups + a.channels, b.groups + b.channels))
    streamer = LayerStreamer(copy.deepcopy(dense), StreamingConfig(device="cpu"))
    try:
        c = repair_sensitivity(streamer, IDS, DAMP, batch_size=4)
    finally:
        streamer.close()
    for x, y in zip(a.groups + a.channels, c.groups + c.channels, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-12)
        assert torch.equal(torch.argsort(x), torch.argsort(y))


def test_sensitivity_costs_follow_the_greedy_order_and_the_residual_scale():
    dense = tiny_model("llama4")
    costs = repair_sensitivity(ResidentLayers(dense), IDS, DAMP, batch_size=4)
    # the channel order of layer 0 is the greedy removal order on its down_proj Gram, each
    # token weighted by 1 / mean square of the stream entering the layer
    walk = ResidentLayers(dense)
    states, calls = walk.capture(list(IDS.split(4)))
    down = walk.adapter.mlp_projections(walk.layers[0])[2]
    from gqa_prune.compensation.sensitivity import _token_weights
    from gqa_prune.compensation.stats import InputStats

    weights = [h.float().square().mean(-1).reciprocal() for h in states]
    torch.testing.assert_close(weights, [_token_weights(h) for h in states])
    stats = InputStats(down, True, weights=weights)
    for h, c in zip(states, calls, strict=True):
        walk.run(walk.layers[0], h, c)
    stats.remove()
    trace = greedy_removal(down.weight, stats.gram, down.in_features, DAMP)
    assert torch.argsort(costs.channels[0]).tolist() == list(trace.removed)
    # scaling a layer's down_proj by s scales its refit errors by s^2 and nothing else in
    # that layer's input: its channel costs follow (gain 1 for Llama's MLP output)
    scaled = copy.deepcopy(dense)
    with torch.no_grad():
        get_adapter(scaled).mlp_projections(get_adapter(scaled).decoder_layers(scaled)[2])[
            2
        ].weight.mul_(0.1)
    cheap = repair_sensitivity(ResidentLayers(scaled), IDS, DAMP, batch_size=4)
    ratio = cheap.channels[2].sum() / costs.channels[2].sum()
    assert ratio == pytest.approx(0.01, rel=0.05)


def test_sensitivity_mode_prunes_the_cheap_layer_hardest_without_unit_scores(monkeypatch):
    dense = tiny_model("llama4", num_hidden_layers=4)
    with torch.no_grad():  # layer 1's MLP barely writes to the stream: cheap to cut
        adapter = get_adapter(dense)
        adapter.mlp_projections(adapter.decoder_layers(dense)[1])[2].weight.mul_(1e-3)

    def no_scores(*args, **kwargs):
        raise AssertionError("sensitivity mode must not compute unit scores")

    monkeypatch.setattr(pipeline_mod, "compute_unit_scores", no_scores)
    config = AllocationConfig(0.3)
    model = copy.deepcopy(dense)
    out = prune_model_(
        model, IDS, config, mode="sensitivity", batch_size=4, progress=False, selection="repair"
    )
    assert abs(out.allocation.achieved_ratio - 0.3) <= 0.005
    sizes = out.after.intermediate_sizes
    assert sizes[1] == min(sizes) and sizes[1] < 0.5 * max(sizes)
    assert out.after.queries_per_kv == out.before.queries_per_kv
    assert len(model.model.layers[1].mlp.down_proj.weight[0]) == sizes[1]
    # streaming gives the same plan and weights
    streamed = LayerStreamer(copy.deepcopy(dense), StreamingConfig(device="cpu"))
    try:
        out_s = prune_model_(
            streamed.model,
            IDS,
            config,
            mode="sensitivity",
            batch_size=4,
            progress=False,
            selection="repair",
            streaming=streamed,
        )
        streamed.gather_("cpu")
        assert out_s.plan == out.plan
        for p, q in zip(model.parameters(), streamed.model.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    finally:
        streamed.close()


def test_sensitivity_mode_with_score_selection_keeps_the_greedys_survivors():
    dense = tiny_model("llama4")
    costs = repair_sensitivity(ResidentLayers(dense), IDS, DAMP, batch_size=4)
    out = prune_model_(
        copy.deepcopy(dense),
        IDS,
        AllocationConfig(0.3),
        mode="sensitivity",
        batch_size=4,
        progress=False,
        selection="score",
    )
    for lp, c in zip(out.plan.layers, costs.channels, strict=True):
        last = torch.argsort(c, descending=True)[: len(lp.keep_mlp_channels)]
        assert sorted(last.tolist()) == list(lp.keep_mlp_channels)


def test_sensitivity_mode_needs_calibration_ids():
    with pytest.raises(GQAPruneError, match="calibration ids"):
        repair_sensitivity(ResidentLayers(tiny_model("llama4")), IDS[0], DAMP)


def test_cli_sensitivity_mode_skips_the_layer_analysis(tiny_run):
    import json

    from gqa_prune.analysis import FILE_NAME
    from gqa_prune.cli import main

    from conftest import tiny_args

    args = ("--pruning_ratio", "0.3", "--prune_mlp", "--pruning_mode", "sensitivity")
    assert main(tiny_args(tiny_run, *args, "--save_ckpt_log_name", "s")) == 0
    root = tiny_run["logs"] / "s"
    summary = json.loads((root / "summary.json").read_text())
    assert summary["method"]["allocation"] == "sensitivity"
    assert summary["method"]["layer_importance"] is None
    assert summary["method"]["importance"] is None and summary["method"]["selection"] == "repair"
    assert summary["layer_importance"] == {"method": None, "scores": []}
    assert "layer_importance" not in summary["timings_s"]
    assert not (root / FILE_NAME).exists()
    assert (root / "report.html").is_file() and (root / "pruning_strategy.png").is_file()
    assert abs(summary["allocation"]["achieved_ratio"] - 0.3) <= 0.005
    # freezing layers by importance still measures it
    frozen = ("--freeze_top_n_layers", "1", "--save_ckpt_log_name", "f")
    assert main(tiny_args(tiny_run, *args, *frozen)) == 0
    summary = json.loads((tiny_run["logs"] / "f" / "summary.json").read_text())
    assert summary["method"]["layer_importance"] == "removal"
    assert (tiny_run["logs"] / "f" / FILE_NAME).is_file()
    frozen_layer = max(
        range(len(summary["layer_importance"]["scores"])),
        key=lambda i: summary["layer_importance"]["scores"][i],
    )
    assert summary["allocation"]["layers"][frozen_layer]["rate"] == 0


def test_input_stats_token_weights_weigh_the_gram_matrix_only():
    from gqa_prune.compensation.stats import InputStats

    lin = torch.nn.Linear(4, 3)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 5, 4, generator=g) for _ in range(2)]
    ws = [torch.rand(2, 5, generator=g) for _ in range(2)]
    plain, weighted = InputStats(lin, True), InputStats(lin, True, weights=ws)
    with torch.no_grad():
        for x in xs:
            lin(x)
    x = torch.cat([t.reshape(-1, 4) for t in xs])
    w = torch.cat([t.reshape(-1) for t in ws])
    torch.testing.assert_close(weighted.gram, x.T @ (x * w[:, None]))
    torch.testing.assert_close(plain.gram, x.T @ x)
    torch.testing.assert_close(weighted.mean, plain.mean)


def test_token_weights_are_the_inverse_mean_square():
    from gqa_prune.compensation.sensitivity import _token_weights

    h = torch.tensor([[[1.0, 1.0], [3.0, 4.0], [0.0, 0.0]]])
    torch.testing.assert_close(_token_weights(h), torch.tensor([[1.0, 2 / 25, 0.0]]))


def _full_model_gradient_weights(model, batches):
    """||d sum-NLL / d h_l||^2 per token from one ordinary full-model backward (reference)."""
    from gqa_prune.analysis.decoder_stack import hidden_of

    layers = get_adapter(model).decoder_layers(model)
    out: list[list[torch.Tensor]] = [[] for _ in layers]
    kept: list[torch.Tensor] = []
    for ids in batches:
        kept.clear()
        hooks = [
            layer.register_forward_hook(lambda m, a, o: kept.append(hidden_of(o)))
            for layer in layers
        ]
        try:
            logits = model(input_ids=ids).logits[:, :-1].float()
        finally:
            for h in hooks:
                h.remove()
        for h in kept:
            h.retain_grad()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        loss.backward()
        for i, h in enumerate(kept):
            out[i].append(h.grad.square().sum(-1))
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("kind", ["llama4", "gemma3"])
def test_gradient_weights_equal_a_full_model_backward_in_memory_and_streamed(kind):
    from gqa_prune.compensation import output_gradient_weights

    dense = tiny_model(kind)
    batches = list(IDS.split(4))
    before = [p.detach().clone() for p in dense.parameters()]
    flags = [p.requires_grad for p in dense.parameters()]
    got = output_gradient_weights(ResidentLayers(dense), batches)
    assert all(torch.equal(p, q) for p, q in zip(before, dense.parameters(), strict=True))
    assert [p.requires_grad for p in dense.parameters()] == flags
    assert all(p.grad is None for p in dense.parameters())
    want = _full_model_gradient_weights(copy.deepcopy(dense), batches)
    assert len(got) == len(want) == get_adapter(dense).geometry(dense).num_layers
    for g_layer, w_layer in zip(got, want, strict=True):
        for g, w in zip(g_layer, w_layer, strict=True):
            assert g.shape == w.shape == (4, IDS.shape[1])
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-10)
    # the last position predicts nothing: no gradient reaches it from the loss
    assert float(got[-1][0][:, -1].abs().max()) == 0.0
    streamer = LayerStreamer(copy.deepcopy(dense), StreamingConfig(device="cpu"))
    try:
        streamed = output_gradient_weights(streamer, batches)
    finally:
        streamer.close()
    for g_layer, s_layer in zip(got, streamed, strict=True):
        for g, s in zip(g_layer, s_layer, strict=True):
            torch.testing.assert_close(g, s, rtol=1e-5, atol=1e-12)


def test_gradient_weights_price_the_curves_and_stream_like_in_memory():
    from gqa_prune.compensation import output_gradient_weights
    from gqa_prune.compensation.stats import InputStats

    dense = tiny_model("llama4")
    grad = repair_sensitivity(ResidentLayers(dense), IDS, DAMP, batch_size=4, weights="gradient")
    stream = repair_sensitivity(ResidentLayers(dense), IDS, DAMP, batch_size=4)
    assert any(
        not torch.allclose(a, b) for a, b in zip(grad.channels, stream.channels, strict=True)
    )
    # layer 1's channel order is the greedy's on the down_proj Gram weighted by (6)
    walk = ResidentLayers(dense)
    batches = list(IDS.split(4))
    weights = output_gradient_weights(walk, batches)[1]
    states, calls = walk.capture(batches)
    with torch.no_grad():
        states = [walk.run(walk.layers[0], h, c) for h, c in zip(states, calls, strict=True)]
    down = walk.adapter.mlp_projections(walk.layers[1])[2]
    stats = InputStats(down, True, weights=weights)
    with torch.no_grad():
        for h, c in zip(states, calls, strict=True):
            walk.run(walk.layers[1], h, c)
    stats.remove()
    trace = greedy_removal(down.weight, stats.gram, down.in_features, DAMP)
    assert torch.argsort(grad.channels[1]).tolist() == list(trace.removed)
    streamer = LayerStreamer(copy.deepcopy(dense), StreamingConfig(device="cpu"))
    try:
        streamed = repair_sensitivity(streamer, IDS, DAMP, batch_size=4, weights="gradient")
    finally:
        streamer.close()
    for x, y in zip(grad.groups + grad.channels, streamed.groups + streamed.channels, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-12)
    with pytest.raises(GQAPruneError, match="unknown sensitivity weights 'fisher'"):
        repair_sensitivity(ResidentLayers(dense), IDS, DAMP, batch_size=4, weights="fisher")


def test_cli_sensitivity_gradient_weights(tiny_run):
    import json

    from gqa_prune.cli import main

    from conftest import tiny_args

    args = ("--pruning_ratio", "0.3", "--prune_mlp", "--pruning_mode", "sensitivity")
    grad = ("--sensitivity_weights", "gradient", "--save_ckpt_log_name", "g")
    assert main(tiny_args(tiny_run, *args, *grad)) == 0
    summary = json.loads((tiny_run["logs"] / "g" / "summary.json").read_text())
    assert summary["method"]["sensitivity_weights"] == "gradient"
    assert abs(summary["allocation"]["achieved_ratio"] - 0.3) <= 0.005
    assert summary["method"]["importance"] is None  # no unit scores: only (6)'s backward
    with pytest.raises(SystemExit) as exc:
        main(tiny_args(tiny_run, *args, "--sensitivity_weights", "fisher"))
    assert exc.value.code != 0
