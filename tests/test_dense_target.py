"""Dense targets: the refit to the dense outputs, its selection, the option end to end."""

import copy
import itertools
import json

import pytest
import torch

from gqa_prune import AllocationConfig, GQAPruneError, prune_model_
from gqa_prune import pipeline as pipeline_mod
from gqa_prune.compensation import (
    blend_cross,
    prune_sequential_,
    rescale_rows,
    ridge_refit,
    target_blend,
)
from gqa_prune.compensation.selection import (
    greedy_removal,
    removal_error,
    ridge_lambda,
    unit_columns,
)
from gqa_prune.compensation.sequential import check_compensation
from gqa_prune.compensation.solve import split_features
from gqa_prune.compensation.stats import InputStats
from gqa_prune.config import RunConfig
from gqa_prune.models.adapters import get_adapter
from gqa_prune.streaming import LayerStreamer, StreamingConfig

from conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

DAMP = 0.1
LAYERS = {"groups": (4, 8), "channels": (8, 1)}  # (units, columns per unit)


def drifted_layer(n_units: int, width: int, seed: int, out: int = 6, tokens: int = 64):
    """(X, Y, W): pruned-stream inputs X, dense outputs Y = X_d W^T from drifted inputs X_d."""
    g = torch.Generator().manual_seed(seed)
    n_in = n_units * width
    mix = torch.randn(n_in, n_in, generator=g, dtype=torch.float64) / n_in**0.5
    x_dense = torch.randn(tokens, n_in, generator=g, dtype=torch.float64) @ (torch.eye(n_in) + mix)
    x = x_dense + 0.3 * torch.randn(tokens, n_in, generator=g, dtype=torch.float64)
    w = torch.randn(out, n_in, generator=g, dtype=torch.float64)
    return x, x_dense @ w.T, w


def lstsq_fit(x, y, w, kept, lam):
    """``argmin_V ||Y - X_S V^T||^2 + lam ||V - W_S||^2`` and its value, by least squares on
    the augmented rows ``[X_S; sqrt(lam) I] V^T = [Y; sqrt(lam) W_S^T]``."""
    a = torch.cat([x[:, kept], lam**0.5 * torch.eye(kept.numel(), dtype=x.dtype)])
    b = torch.cat([y, lam**0.5 * w[:, kept].T])
    v_t = torch.linalg.lstsq(a, b, driver="gelsd").solution
    return v_t.T, float((a @ v_t - b).square().sum())


@pytest.mark.parametrize("seed", range(3))
def test_dense_target_refit_equals_a_direct_least_squares_solve(seed):
    x, y, w = drifted_layer(8, 1, seed)
    gram, cross = x.T @ x, x.T @ y
    for keep in ([0, 2, 3, 5, 7], [1, 4], list(range(8))):
        kept, _ = split_features(keep, 8)
        lam = DAMP * float(gram[kept[:, None], kept].diagonal().mean())  # ridge_refit's lam
        expected, _ = lstsq_fit(x, y, w, kept, lam)
        got = ridge_refit(w, gram, kept, DAMP, cross=cross)
        torch.testing.assert_close(got.double(), expected, rtol=1e-8, atol=1e-8)
    # Y = X W^T (C = G W^T) is exactly the local target
    kept, _ = split_features([0, 2, 3, 5, 7], 8)
    torch.testing.assert_close(
        ridge_refit(w, gram, kept, DAMP, cross=gram @ w.T), ridge_refit(w, gram, kept, DAMP)
    )


@pytest.mark.parametrize("share", [0.25, 0.7])
def test_blended_target_refit_equals_a_direct_least_squares_solve(share):
    x, y, w = drifted_layer(8, 1, seed=5)
    gram, cross = x.T @ x, x.T @ y
    blended = blend_cross(cross, gram, w, share)
    kept, _ = split_features([0, 2, 3, 5, 7], 8)
    lam = DAMP * float(gram[kept[:, None], kept].diagonal().mean())
    y_share = (1 - share) * x @ w.T + share * y  # the blended target itself
    expected, value = lstsq_fit(x, y_share, w, kept, lam)
    got = ridge_refit(w, gram, kept, DAMP, cross=blended)
    torch.testing.assert_close(got.double(), expected, rtol=1e-8, atol=1e-8)
    # it minimises the blend of the two objectives (they differ from it by a constant)
    local_fit = ridge_refit(w, gram, kept, DAMP)
    dense_fit = ridge_refit(w, gram, kept, DAMP, cross=cross)

    def blend_objective(v):
        fit = x[:, kept] @ v.T
        return (
            (1 - share) * (x @ w.T - fit).square().sum()
            + share * (y - fit).square().sum()
            + lam * (v - w[:, kept]).square().sum()
        )

    assert blend_objective(got) < min(blend_objective(local_fit), blend_objective(dense_fit))
    # linear in the share, with the two named targets at its ends
    torch.testing.assert_close(got, (1 - share) * local_fit + share * dense_fit)
    torch.testing.assert_close(blend_cross(cross, gram, w, 0.0), gram @ w.T)
    torch.testing.assert_close(blend_cross(cross, gram, w, 1.0), cross)
    with pytest.raises(GQAPruneError, match="share"):
        blend_cross(cross, gram, w, 1.5)


def test_target_names_and_numbers():
    assert target_blend("local") == 0.0 and target_blend("dense") == 1.0
    assert target_blend("0.25") == 0.25 and target_blend("1") == 1.0
    for bad in ("global", "1.5", "-0.1", "nan", ""):
        with pytest.raises(GQAPruneError, match="local, dense or a number in"):
            target_blend(bad)
    with pytest.raises(GQAPruneError, match="needs --compensation lstsq"):
        check_compensation("bias", DAMP, "0.5")
    check_compensation("bias", DAMP, "0")  # no share of the dense outputs: nothing to carry


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("seed", [0, 1])
def test_dense_target_removal_error_is_the_direct_objective_minus_the_full_fit(layer, seed):
    n_units, width = LAYERS[layer]
    x, y, w = drifted_layer(n_units, width, seed)
    gram, cross = x.T @ x, x.T @ y
    lam = ridge_lambda(gram, DAMP)
    _, full = lstsq_fit(x, y, w, torch.arange(n_units * width), lam)  # F(W*)
    for k in range(n_units):  # at least one unit stays
        for r in itertools.combinations(range(n_units), k):
            removed = unit_columns(list(r), width)
            kept, _ = split_features(
                [i for i in range(n_units * width) if i not in set(removed.tolist())],
                n_units * width,
            )
            _, direct = lstsq_fit(x, y, w, kept, lam)
            got = removal_error(w, gram, removed, lam, cross)
            assert got == pytest.approx(direct - full, rel=1e-7, abs=1e-7), r


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("seed", range(3))
def test_dense_target_greedy_step_is_the_exhaustive_argmin_and_its_refit_the_solution(layer, seed):
    n_units, width = LAYERS[layer]
    x, y, w = drifted_layer(n_units, width, seed + 5)
    gram, cross = x.T @ x, x.T @ y
    lam = ridge_lambda(gram, DAMP)
    for k in range(1, n_units):
        got = greedy_removal(w, gram, k, DAMP, width, chunk=1, cross=cross)
        errors = {
            r: removal_error(w, gram, unit_columns(list(r), width), lam, cross)
            for r in itertools.combinations(range(n_units), k)
        }
        assert got.error == pytest.approx(errors[tuple(sorted(got.removed))], rel=1e-8, abs=1e-8)
        assert got.error >= min(errors.values()) - 1e-8
        if k == 1:
            assert got.removed == min(errors, key=errors.__getitem__)
        # the refit left by the downdates is the direct solution on the kept set
        gone = set(unit_columns(list(got.removed), width).tolist())
        kept = torch.tensor([i for i in range(n_units * width) if i not in gone])
        expected, _ = lstsq_fit(x, y, w, kept, lam)
        torch.testing.assert_close(got.refit[:, kept], expected, rtol=1e-7, atol=1e-7)
        assert got.refit[:, sorted(gone)].abs().max() == 0


@pytest.mark.parametrize("layer", LAYERS)
def test_dense_target_greedy_equals_exhaustive_search_when_units_do_not_interact(layer):
    """Block-diagonal G: the objective is additive over units, so greedy must be optimal."""
    n_units, width = LAYERS[layer]
    g = torch.Generator().manual_seed(9)
    x = torch.zeros(8 * n_units, n_units * width, dtype=torch.float64)
    for u in range(n_units):
        x[8 * u : 8 * (u + 1), u * width : (u + 1) * width] = (0.5 + u % 3) * torch.randn(
            8, width, generator=g, dtype=torch.float64
        )
    w = torch.randn(5, n_units * width, generator=g, dtype=torch.float64)
    y = (x + 0.2 * torch.randn(x.shape, generator=g, dtype=torch.float64)) @ w.T
    gram, cross = x.T @ x, x.T @ y
    lam = ridge_lambda(gram, DAMP)
    for k in range(1, n_units):
        errors = {
            r: removal_error(w, gram, unit_columns(list(r), width), lam, cross)
            for r in itertools.combinations(range(n_units), k)
        }
        got = greedy_removal(w, gram, k, DAMP, width, chunk=1, cross=cross)
        assert errors[tuple(sorted(got.removed))] == pytest.approx(min(errors.values()))


def test_rescale_rows_keeps_the_direction_and_takes_the_reference_norm():
    g = torch.Generator().manual_seed(5)
    y, ref = torch.randn(7, 5, generator=g), 3 * torch.randn(7, 5, generator=g)
    y[2] = 0.0  # a zero target stays zero (no NaN)
    got = rescale_rows(y, ref)
    for t in range(7):
        if t == 2:
            assert torch.equal(got[t], torch.zeros(5))
            continue
        torch.testing.assert_close(got[t].norm(), ref[t].norm())
        torch.testing.assert_close(got[t] / got[t].norm(), y[t] / y[t].norm())
    torch.testing.assert_close(rescale_rows(ref, ref), ref)  # already the right size
    with pytest.raises(GQAPruneError, match="differ"):
        rescale_rows(y, ref[:, :4])


def test_local_norm_refit_equals_a_direct_least_squares_solve():
    """The hook's cross product with ``rescale`` is ``X^T Y'`` with ``Y'_t`` the dense output
    at the local output's norm; blended and refitted, it is the least-squares fit of
    ``(1 - b) X W^T + b Y'`` (computed token by token here, not by the library)."""
    x, y, w = drifted_layer(8, 1, seed=4)
    x, y, w = x.float(), y.float(), w.float()
    linear = torch.nn.Linear(8, 6, bias=False)
    linear.weight.data.copy_(w)
    batches = (x[:40].reshape(5, 8, 8), x[40:].reshape(3, 8, 8))
    targets = [y[:40].reshape(5, 8, 6), y[40:].reshape(3, 8, 6)]
    stats = InputStats(linear, gram=True, targets=targets, rescale=True)
    with torch.no_grad():
        for b in batches:
            linear(b)
    stats.remove()
    y_rescaled = torch.stack(
        [y[t] * (x[t] @ w.T).norm() / y[t].norm() for t in range(x.shape[0])]
    ).double()
    x64, w64 = x.double(), w.double()
    torch.testing.assert_close(stats.cross.double(), x64.T @ y_rescaled, rtol=1e-4, atol=1e-4)
    share = 0.25
    kept, _ = split_features([0, 2, 3, 5, 7], 8)
    gram = x64.T @ x64
    lam = DAMP * float(gram[kept[:, None], kept].diagonal().mean())
    expected, _ = lstsq_fit(x64, (1 - share) * x64 @ w64.T + share * y_rescaled, w64, kept, lam)
    cross = blend_cross(stats.cross.double(), gram, w64, share)
    got = ridge_refit(w64, gram, kept, DAMP, cross=cross)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # and it is not the fit of the plain dense outputs
    plain, _ = lstsq_fit(x64, (1 - share) * x64 @ w64.T + share * y.double(), w64, kept, lam)
    assert not torch.allclose(got, plain, rtol=1e-3, atol=1e-3)


# ---- end to end --------------------------------------------------------------------------

IDS = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(3))
ALLOC = AllocationConfig(pruning_ratio=0.35, prune_mlp=True, distribution=(3, 7))
RUN = dict(layer_importance=[1.0, 3.0, 0.5], batch_size=4, progress=False, compensation="lstsq")


@torch.no_grad()
def output_error(model, dense, ids):
    """Squared distance of the final hidden states (before the LM head) to the dense model's."""
    h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    d = dense(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    return float((h - d).square().sum())


@pytest.mark.parametrize("selection", ["score", "repair"])
def test_dense_target_end_to_end(kind, selection):
    dense = tiny_model(kind, num_hidden_layers=4)
    run = dict(RUN, layer_importance=[1.0, 3.0, 0.5, 2.0], selection=selection)
    local_model, dense_model = copy.deepcopy(dense), copy.deepcopy(dense)
    local = prune_model_(local_model, IDS, ALLOC, **run)
    target = prune_model_(dense_model, IDS, ALLOC, compensation_target="dense", **run)
    assert target.after == local.after  # same counts: exact target, Q:KV ratio kept
    assert all(
        q == kv * target.before.queries_per_kv
        for q, kv in zip(target.after.q_heads, target.after.kv_heads, strict=True)
    )
    if selection == "score":
        assert target.plan == local.plan
    # the weights differ (the refit corrects the drift), and the calibration outputs are
    # closer to the dense model's than with local targets
    differ = any(
        not torch.equal(a, b)
        for a, b in zip(dense_model.state_dict().values(), local_model.state_dict().values())
    )
    assert differ
    assert output_error(dense_model, dense, IDS) < output_error(local_model, dense, IDS)
    # deterministic, and streaming equals in memory
    again = prune_model_(copy.deepcopy(dense), IDS, ALLOC, compensation_target="dense", **run)
    assert again.plan == target.plan
    streamer = LayerStreamer(copy.deepcopy(dense), StreamingConfig(device="cpu"))
    streamed = prune_model_(
        streamer.model, IDS, ALLOC, streaming=streamer, compensation_target="dense", **run
    )
    assert streamed.plan == target.plan and streamed.after == target.after
    gathered = streamer.gather_("cpu")
    for (name, p), q in zip(gathered.state_dict().items(), dense_model.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_blended_target_end_to_end(kind):
    """Same plan (score selection): share 0 is the local target; layer 0's ``down_proj`` (whose
    inputs alone drift: layer 0's attention was cut) is the blend of the two named fits;
    streaming equals in memory."""
    dense = tiny_model(kind, num_hidden_layers=3)
    models = {t: copy.deepcopy(dense) for t in ("local", "dense", "0", "0.25")}
    plans = {
        t: prune_model_(m, IDS, ALLOC, compensation_target=t, **RUN) for t, m in models.items()
    }
    assert len({str(p.plan) for p in plans.values()}) == 1
    for a, b in zip(models["0"].state_dict().values(), models["local"].state_dict().values()):
        assert torch.equal(a, b)

    def down(target):
        adapter = get_adapter(models[target])
        return adapter.mlp_projections(adapter.decoder_layers(models[target])[0])[2].weight

    expected = 0.75 * down("local") + 0.25 * down("dense")
    torch.testing.assert_close(down("0.25"), expected, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(down("0.25"), down("local"), rtol=1e-3, atol=1e-5)
    assert output_error(models["0.25"], dense, IDS) < output_error(models["local"], dense, IDS)
    streamer = LayerStreamer(copy.deepcopy(dense), StreamingConfig(device="cpu"))
    streamed = prune_model_(
        streamer.model, IDS, ALLOC, streaming=streamer, compensation_target="0.25", **RUN
    )
    assert streamed.plan == plans["0.25"].plan
    gathered = streamer.gather_("cpu")
    for (name, p), q in zip(gathered.state_dict().items(), models["0.25"].state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_local_norm_target_end_to_end(kind):
    """``target_norm local``: no effect on the local target; layer 0's ``o_proj`` (inputs
    not drifted yet: its dense outputs are its own) is unchanged; the refits differ from the
    plain blend further up; streaming equals in memory."""
    dense = tiny_model(kind, num_hidden_layers=3)
    cases = {
        "local/local": ("local", "local"),
        "local/dense": ("local", "dense"),
        "0.5/dense": ("0.5", "dense"),
        "0.5/local": ("0.5", "local"),
    }
    models = {name: copy.deepcopy(dense) for name in cases}
    outcomes = {
        name: prune_model_(
            models[name], IDS, ALLOC, compensation_target=t, compensation_target_norm=n, **RUN
        )
        for name, (t, n) in cases.items()
    }
    assert len({str(o.plan) for o in outcomes.values()}) == 1
    for a, b in zip(
        models["local/local"].state_dict().values(), models["local/dense"].state_dict().values()
    ):
        assert torch.equal(a, b)

    def projections(name, layer):
        adapter = get_adapter(models[name])
        block = adapter.decoder_layers(models[name])[layer]
        o = adapter.attention_projections(block)[3] if adapter.has_attention(block) else None
        return o, adapter.mlp_projections(block)[2]

    o_plain, _ = projections("0.5/dense", 0)
    o_local, _ = projections("0.5/local", 0)
    if o_plain is not None:
        torch.testing.assert_close(o_local.weight, o_plain.weight, rtol=1e-4, atol=1e-6)
    changed = [
        not torch.allclose(p.weight, q.weight, rtol=1e-3, atol=1e-5)
        for layer in range(3)
        for p, q in zip(projections("0.5/local", layer), projections("0.5/dense", layer))
        if p is not None
    ]
    assert any(changed)
    streamer = LayerStreamer(copy.deepcopy(dense), StreamingConfig(device="cpu"))
    streamed = prune_model_(
        streamer.model,
        IDS,
        ALLOC,
        streaming=streamer,
        compensation_target="0.5",
        compensation_target_norm="local",
        **RUN,
    )
    assert streamed.plan == outcomes["0.5/local"].plan
    gathered = streamer.gather_("cpu")
    for (name, p), q in zip(
        gathered.state_dict().items(), models["0.5/local"].state_dict().values()
    ):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_repair_selection_in_layer_mode_computes_no_unit_scores(monkeypatch):
    dense = tiny_model()
    # the reference: a plan from real scores, re-chosen by repair (only its counts matter)
    scored = prune_model_(copy.deepcopy(dense), IDS, ALLOC, **RUN)

    def refuse(*args, **kwargs):
        raise AssertionError("unit scores computed although repair selection ignores them")

    monkeypatch.setattr(pipeline_mod, "compute_unit_scores", refuse)
    model = copy.deepcopy(dense)
    outcome = prune_model_(model, IDS, ALLOC, selection="repair", **RUN)
    reference = copy.deepcopy(dense)
    plan, _ = prune_sequential_(reference, scored.plan, IDS, batch_size=4, selection="repair")
    assert outcome.plan == plan
    for (name, p), q in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(p, q, msg=name)
    with pytest.raises(AssertionError, match="unit scores computed"):  # global mode needs them
        prune_model_(copy.deepcopy(dense), IDS, ALLOC, mode="global", selection="repair", **RUN)


def test_dense_target_input_errors(tiny_run, capsys):
    from gqa_prune.cli import main

    from conftest import tiny_args

    with pytest.raises(GQAPruneError, match="needs --compensation lstsq"):
        prune_model_(tiny_model(), IDS, ALLOC, compensation="bias", compensation_target="dense")
    with pytest.raises(GQAPruneError, match="unknown compensation target"):
        prune_model_(tiny_model(), IDS, ALLOC, compensation_target="global")
    with pytest.raises(GQAPruneError, match="needs --compensation lstsq"):
        RunConfig(compensation="none", compensation_target="dense")
    bad = tiny_args(tiny_run, "--compensation_target", "dense", "--compensation", "bias")
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert "--compensation lstsq" in err and "Traceback" not in err
    bad = tiny_args(tiny_run, "--compensation_target", "1.5")
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert "unknown compensation target '1.5'" in err and "Traceback" not in err
    with pytest.raises(GQAPruneError, match="unknown compensation target norm 'unit'"):
        prune_model_(tiny_model(), IDS, ALLOC, compensation_target_norm="unit")
    with pytest.raises(GQAPruneError, match="unknown compensation target norm"):
        RunConfig(compensation_target_norm="unit")
    bad = tiny_args(tiny_run, "--compensation_target_norm", "unit")
    with pytest.raises(SystemExit) as exit_info:  # argparse choices
        main(bad)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--compensation_target_norm" in err and "Traceback" not in err
    ok = tiny_args(
        tiny_run, "--pruning_ratio", "0.3", "--prune_mlp", "--compensation_target", "0.5"
    )
    assert main(ok) == 0
    summary = json.loads((tiny_run["logs"] / "gqa_prune_run" / "summary.json").read_text())
    assert summary["method"]["compensation_target_norm"] == "local"  # the default
    ok = tiny_args(
        tiny_run,
        "--pruning_ratio",
        "0.3",
        "--prune_mlp",
        "--compensation_target",
        "0.5",
        "--compensation_target_norm",
        "dense",
        "--save_ckpt_log_name",
        "norm_dense",
    )
    assert main(ok) == 0
    summary = json.loads((tiny_run["logs"] / "norm_dense" / "summary.json").read_text())
    assert summary["method"]["compensation_target"] == "0.5"
    assert summary["method"]["compensation_target_norm"] == "dense"


def test_streaming_memory_estimate_counts_repair_dense_targets_and_no_gradients():
    from gqa_prune.streaming.pipeline import plan_memory

    model = tiny_model(intermediate_size=512)  # the down_proj Gram dominates the step

    def largest(**kw):
        return plan_memory(model, 2, 16, "taylor", "lstsq", **kw).largest

    score, repair = largest(), largest(selection="repair")
    dense = largest(selection="repair", target="dense")
    assert score.step == repair.step == "lstsq"
    n, o = 512, 48
    assert score.working == 16 * n * n + 24 * n * o  # Gram fp32 + the fp64 solve
    assert repair.working == 20 * n * n + 8 * n * o  # Gram fp32 + H^-1, its copy, W' (fp64)
    assert dense.working == repair.working + 4 * n * o  # + X^T Y (fp32)
    assert largest(selection="repair", target="0.25") == dense  # a blend carries the same
    assert largest(selection="repair", target="0") == repair
    # repair in layer mode needs no backward: smaller activations than Taylor scoring
    assert repair.activations < score.activations
    assert largest(selection="repair", mode="global").activations == score.activations


def test_streaming_memory_estimate_counts_the_longer_compensation_windows():
    from gqa_prune.streaming.pipeline import plan_memory

    model = tiny_model()
    same = plan_memory(model, 2, 16, "taylor", "lstsq", selection="repair").largest
    longer = plan_memory(
        model, 2, 16, "taylor", "lstsq", selection="repair", compensation_seq_len=64
    ).largest
    # the refit's windows run through each layer: activations and attention scores grow
    assert longer.activations > same.activations
    assert longer.working == same.working  # the Gram matrices do not depend on the length
    shorter = plan_memory(
        model, 2, 16, "taylor", "lstsq", selection="repair", compensation_seq_len=8
    ).largest
    assert shorter == same  # the scoring windows stay the bound
    none = plan_memory(model, 2, 16, "taylor", "none", compensation_seq_len=64).largest
    assert none == plan_memory(model, 2, 16, "taylor", "none").largest
