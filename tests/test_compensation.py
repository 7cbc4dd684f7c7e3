"""Compensation: ridge refit / FLAP bias of the projections that read a pruned dimension."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from gqa_prune.analysis.decoder_stack import hidden_of, trace_decoder_stack
from gqa_prune.cli import main
from gqa_prune.compensation import (
    OUTPUT_BIAS_FLAG,
    apply_plan_sequential_,
    removed_mean_contribution,
    ridge_refit,
)
from gqa_prune.errors import GQAPruneError
from gqa_prune.models.adapters import get_adapter
from gqa_prune.models.checkpoint import load_pruned, save_pruned
from gqa_prune.plan import LayerPlan, PruningPlan
from gqa_prune.slicing import apply_plan_

from conftest import tiny_args, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def calib():
    torch.manual_seed(2)
    return torch.randint(0, 128, (8, 16))


def make_plan(model, groups=None, channels=None) -> PruningPlan:
    """Per-layer kept units; ``groups`` / ``channels``: layer -> kept indices (default all)."""
    geom = get_adapter(model).geometry(model)
    groups, channels = groups or {}, channels or {}
    return PruningPlan(
        tuple(
            LayerPlan(
                i,
                tuple(groups.get(i, range(geom.kv_heads[i]))),
                tuple(channels.get(i, range(geom.intermediate_sizes[i]))),
            )
            for i in range(geom.num_layers)
        ),
        geom.queries_per_kv,
        geom.head_dim,
    )


def uneven_plan(model) -> PruningPlan:
    n_kv = get_adapter(model).geometry(model).kv_heads[0]
    return make_plan(
        model,
        groups={i: range(i % n_kv, n_kv) for i in range(3)},
        channels={i: range(0, 96, i + 2) for i in range(3)},
    )


def pruned_copy(model, plan, compensation, ids=None, damp=1e-3):
    other = copy.deepcopy(model)
    if compensation == "delete":
        apply_plan_(other, plan)
    else:
        apply_plan_sequential_(other, plan, ids, compensation, damp=damp, batch_size=4)
    return other


@torch.no_grad()
def outputs_of(model, module_of, ids):
    """Outputs of ``module_of(model)`` during a forward on ``ids``, (tokens, features)."""
    seen = []
    handle = module_of(model).register_forward_hook(
        lambda m, a, out: seen.append(hidden_of(out).reshape(-1, hidden_of(out).shape[-1]))
    )
    model(input_ids=ids)
    handle.remove()
    return torch.cat(seen)


# ------------------------------------------------------------------ the tensor math
def test_ridge_refit_is_the_least_squares_solution():
    torch.manual_seed(0)
    x = torch.randn(300, 16, dtype=torch.float64) @ torch.randn(16, 16, dtype=torch.float64)
    w = torch.randn(8, 16, dtype=torch.float64)
    keep = [0, 2, 3, 5, 8, 9, 12, 15]
    refit = ridge_refit(w, x.T @ x, keep, damp=1e-12)
    expected = torch.linalg.lstsq(x[:, keep], x @ w.T).solution.T  # independent solver
    torch.testing.assert_close(refit, expected, rtol=1e-6, atol=1e-8)
    # strong ridge pulls towards the original kept weights (= plain deletion), not to zero
    torch.testing.assert_close(
        ridge_refit(w, x.T @ x, keep, damp=1e12), w[:, keep], atol=1e-8, rtol=0
    )


def test_failed_cholesky_falls_back_to_least_squares(monkeypatch):
    torch.manual_seed(0)
    x, w = torch.randn(100, 12, dtype=torch.float64), torch.randn(5, 12, dtype=torch.float64)
    expected = ridge_refit(w, x.T @ x, range(7), damp=1e-3)

    def failing(a, *, out):
        out[1].fill_(1)
        return out

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing)
    torch.testing.assert_close(ridge_refit(w, x.T @ x, range(7), damp=1e-3), expected)


def test_nothing_removed_leaves_the_weights_unchanged():
    torch.manual_seed(0)
    x, w = torch.randn(50, 12), torch.randn(5, 12)
    assert torch.equal(ridge_refit(w, x.T @ x, range(12), damp=1e-2), w)
    assert torch.equal(removed_mean_contribution(w, x.mean(0), range(12)), torch.zeros(5))


@pytest.mark.parametrize("compensation", ["lstsq", "bias"])
def test_plan_that_keeps_everything_changes_nothing(calib, batch, compensation):
    model = tiny_model("llama4")
    with torch.no_grad():
        expected = model(input_ids=batch).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    apply_plan_sequential_(model, make_plan(model), calib, compensation, batch_size=4)
    for name, value in model.state_dict().items():
        if name in state:
            assert torch.equal(value, state[name]), name
        else:  # the zero output biases of the bias mode
            assert compensation == "bias" and not value.any(), name
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=batch).logits, expected)


# ----------------------------------------------- the error on calibration data
def test_attention_refit_beats_plain_deletion(kind, calib):
    """o_proj output = the attention block's contribution to the layer output."""
    model = tiny_model(kind)
    n_kv = get_adapter(model).geometry(model).kv_heads[0]
    plan = make_plan(model, groups={0: range(n_kv // 2)})

    def o_proj(m):
        return m.model.layers[0].self_attn.o_proj

    dense = outputs_of(model, o_proj, calib)
    err = {
        c: (outputs_of(pruned_copy(model, plan, c, calib), o_proj, calib) - dense).norm()
        for c in ("delete", "lstsq", "bias")
    }
    assert err["lstsq"] < 0.9 * err["delete"], err
    assert err["bias"] < err["delete"], err


def test_mlp_refit_beats_plain_deletion(kind, calib):
    """With only the MLP cut, the layer output error is the down_proj output error."""
    model = tiny_model(kind)
    plan = make_plan(model, channels={1: range(0, 96, 3)})

    def layer1(m):
        return m.model.layers[1]

    dense = outputs_of(model, layer1, calib)
    err = {
        c: (outputs_of(pruned_copy(model, plan, c, calib), layer1, calib) - dense).norm()
        for c in ("delete", "lstsq", "bias")
    }
    assert err["lstsq"] < 0.9 * err["delete"], err
    assert err["bias"] < err["delete"], err


def test_whole_model_error_drops(calib):
    model = tiny_model("llama4")
    plan = uneven_plan(model)
    dense = trace_decoder_stack(model, calib).output
    err = {
        c: (trace_decoder_stack(pruned_copy(model, plan, c, calib), calib).output - dense).norm()
        for c in ("delete", "lstsq", "bias")
    }
    assert err["lstsq"] < 0.8 * err["delete"], err
    assert err["bias"] < err["delete"], err


# ------------------------------------------------------------- sequential order
def test_layer_l_is_calibrated_on_the_pruned_prefix(calib):
    model = tiny_model("llama4")
    plan = uneven_plan(model)
    dense_input = trace_decoder_stack(model, calib).inputs[2]
    layer1_mlp = model.model.layers[1].mlp
    seen = []  # (layer 1 already sliced?, hidden states entering layer 2)

    def record(module, args, kwargs):
        seen.append((layer1_mlp.down_proj.in_features < 96, args[0].clone()))

    handle = model.model.layers[2].register_forward_pre_hook(record, with_kwargs=True)
    apply_plan_sequential_(model, plan, calib, "lstsq", batch_size=4)
    handle.remove()
    with torch.no_grad():
        prefix_input = trace_decoder_stack(model, calib).inputs[2]
    calibration_passes = [h for pruned, h in seen if pruned]
    assert len(calibration_passes) >= 2  # two batches of 4, at least one pass
    for i in range(0, len(calibration_passes), 2):
        torch.testing.assert_close(torch.cat(calibration_passes[i : i + 2]), prefix_input)
    assert (prefix_input - dense_input).abs().max() > 1e-3  # and they differ from dense ones


# ----------------------------------------------- shapes, ratio, reload, "none"
@pytest.mark.parametrize("compensation", ["lstsq", "bias"])
def test_shapes_ratio_and_reload(kind, batch, tmp_path, compensation, calib):
    model = tiny_model(kind)
    plan = uneven_plan(model)
    deleted = pruned_copy(model, plan, "delete")
    geom = apply_plan_sequential_(model, plan, calib, compensation, batch_size=4)
    ref = get_adapter(deleted).geometry(deleted)
    assert (geom.kv_heads, geom.q_heads, geom.intermediate_sizes, geom.queries_per_kv) == (
        ref.kv_heads,
        ref.q_heads,
        ref.intermediate_sizes,
        ref.queries_per_kv,
    )
    added = 2 * model.config.hidden_size * geom.num_layers if compensation == "bias" else 0
    added -= sum(  # biases that existed before were not added
        (lin.bias is not None) * lin.out_features
        for layer in deleted.model.layers
        for lin in (layer.self_attn.o_proj, layer.mlp.down_proj)
    )
    assert geom.total_params == ref.total_params + added
    with torch.no_grad():
        expected = model(input_ids=batch).logits
    assert not torch.allclose(expected, deleted(input_ids=batch).logits)  # it did something
    out = save_pruned(model, None, tmp_path / "ckpt")
    reloaded, _ = load_pruned(out, device="cpu")
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    for other in (reloaded, remote):
        assert getattr(other.config, OUTPUT_BIAS_FLAG, False) == (compensation == "bias")
        with torch.no_grad():
            torch.testing.assert_close(other(input_ids=batch).logits, expected)


def test_none_equals_apply_plan_exactly(kind):
    model = tiny_model(kind)
    plan = uneven_plan(model)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    geom_a = apply_plan_(a, plan)
    geom_b = apply_plan_sequential_(b, plan, None, "none")
    assert geom_a == geom_b
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_prune_model_switches_on_compensation(calib):
    from gqa_prune.allocation import AllocationConfig
    from gqa_prune.pipeline import prune_model_

    config = AllocationConfig(pruning_ratio=0.2)
    models = {c: tiny_model("llama4") for c in ("none", "lstsq")}
    plans = {
        c: prune_model_(
            m, calib, config, criterion="magnitude", compensation=c, progress=False
        ).plan
        for c, m in models.items()
    }
    assert plans["none"] == plans["lstsq"]  # same choice of units, different repair
    reference = tiny_model("llama4")
    apply_plan_(reference, plans["none"])
    for name, value in reference.state_dict().items():
        assert torch.equal(models["none"].state_dict()[name], value)
    o_none = models["none"].model.layers[0].self_attn.o_proj.weight
    o_lstsq = models["lstsq"].model.layers[0].self_attn.o_proj.weight
    assert o_none.shape == o_lstsq.shape and not torch.equal(o_none, o_lstsq)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(compensation="obs"), "none, lstsq, bias"),
        (dict(compensation="lstsq", damp=0.0), "damp must be > 0"),
        (dict(compensation="lstsq", ids=None), "needs calibration ids"),
    ],
)
def test_bad_settings_are_refused(calib, kwargs, match):
    model = tiny_model("llama4")
    ids = kwargs.pop("ids", calib)
    with pytest.raises(GQAPruneError, match=match):
        apply_plan_sequential_(model, make_plan(model), ids, **kwargs)


# ------------------------------------------------------------------------ CLI
@pytest.mark.parametrize("compensation", ["lstsq", "bias"])
def test_cli_runs_with_compensation_and_the_checkpoint_reloads(tiny_run, compensation):
    argv = tiny_args(
        tiny_run,
        "--prune_mlp",
        "--save_model",
        "--save_ckpt_log_name",
        "c",
        "--compensation",
        compensation,
        "--compensation_samples",
        "4",
    )
    assert main(argv) == 0
    model, _ = load_pruned(tiny_run["logs"] / "c" / "model", device="cpu")
    o_proj = model.model.layers[0].self_attn.o_proj
    assert (o_proj.bias is not None) == (compensation == "bias")


def test_cli_draws_the_compensation_windows_at_their_own_length(tiny_run, monkeypatch):
    """--compensation_seq_len sets the refit's windows; the other passes keep --taylor_seq_len."""
    import gqa_prune.data as data
    import gqa_prune.runner as runner

    drawn, given = [], {}
    real_sample, real_prune = runner.sample_calibration, runner.prune_model_

    def sample(tokens, n, seq_len, seed, bos=None):
        drawn.append((n, seq_len, seed))
        return real_sample(tokens, n, seq_len, seed, bos)

    def prune(model, ids, *args, **kwargs):
        given["calibration"], given["compensation"] = ids.shape, kwargs["compensation_ids"].shape
        return real_prune(model, ids, *args, **kwargs)

    monkeypatch.setattr(runner, "sample_calibration", sample)
    monkeypatch.setattr(data, "sample_calibration", sample)  # under compensation_windows
    monkeypatch.setattr(runner, "prune_model_", prune)
    argv = tiny_args(
        tiny_run,
        "--prune_mlp",
        "--save_ckpt_log_name",
        "w",
        "--compensation_samples",
        "3",
        "--compensation_seq_len",
        "48",
    )
    assert main(argv) == 0
    assert given == {"calibration": (2, 32), "compensation": (3, 48)}
    assert (3, 48, 44) in drawn  # seed + 2, as before the option
    assert {seq for _, seq, seed in drawn if seed != 44} == {32}
    summary = json.loads((tiny_run["logs"] / "w" / "summary.json").read_text())
    assert summary["method"]["compensation_windows"] == [3, 48]


def test_cli_refuses_an_unknown_compensation(tiny_run, capsys):
    with pytest.raises(SystemExit) as exc:
        main(tiny_args(tiny_run, "--compensation", "obs"))
    assert exc.value.code == 2
    assert "lstsq" in capsys.readouterr().err
