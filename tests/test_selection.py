"""Repair-aware selection: closed-form error, greedy removal, downdates, and the pipeline option."""

import copy
import itertools
import json

import pytest
import torch

from gqa_prune import AllocationConfig, GQAPruneError, prune_model_
from gqa_prune.compensation import sequential as sequential_mod
from gqa_prune.compensation.selection import (
    damped_inverse,
    downdate_inverse_,
    greedy_removal,
    removal_error,
    ridge_lambda,
    spd_block_solve,
    unit_columns,
)
from gqa_prune.compensation.solve import split_features
from gqa_prune.config import RunConfig
from gqa_prune.models.adapters import get_adapter
from gqa_prune.streaming import LayerStreamer, StreamingConfig

from conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

DAMP = 0.1
# o_proj of 4 GQA groups x 2 Q heads x head_dim 4 (width 8), and a down_proj of 8 channels
LAYERS = {"groups": (4, 8), "channels": (8, 1)}


def correlated_layer(n_units: int, width: int, seed: int, out: int = 6, tokens: int = 64):
    """(X, W): inputs with correlated features (so the refit matters), weights (out, in)."""
    g = torch.Generator().manual_seed(seed)
    n_in = n_units * width
    mix = torch.randn(n_in, n_in, generator=g, dtype=torch.float64) / n_in**0.5
    x = torch.randn(tokens, n_in, generator=g, dtype=torch.float64) @ (torch.eye(n_in) + mix)
    w = torch.randn(out, n_in, generator=g, dtype=torch.float64)
    return x, w


def direct_error(x: torch.Tensor, w: torch.Tensor, removed: torch.Tensor, lam: float) -> float:
    """``min_V ||X W^T - X_S V^T||^2 + lam ||V - W_S||^2`` by least squares on explicit rows."""
    kept, _ = split_features(
        [i for i in range(w.shape[1]) if i not in set(removed.tolist())], w.shape[1]
    )
    target = x @ w.T
    if kept.numel() == 0:
        return float(target.square().sum())
    a = torch.cat([x[:, kept], lam**0.5 * torch.eye(kept.numel(), dtype=x.dtype)])
    b = torch.cat([target, lam**0.5 * w[:, kept].T])
    v_t = torch.linalg.lstsq(a, b, driver="gelsd").solution
    return float((a @ v_t - b).square().sum())


def exhaustive(w, gram, n_units, width, k, lam):
    """``{removal set: E}`` over every set of ``k`` units."""
    return {
        r: removal_error(w, gram, unit_columns(list(r), width), lam)
        for r in itertools.combinations(range(n_units), k)
    }


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("seed", [0, 1])
def test_closed_form_error_equals_a_direct_least_squares_solve_for_every_set(layer, seed):
    n_units, width = LAYERS[layer]
    x, w = correlated_layer(n_units, width, seed)
    gram = x.T @ x
    lam = ridge_lambda(gram, DAMP)
    for k in range(n_units + 1):
        for r in itertools.combinations(range(n_units), k):
            cols = unit_columns(list(r), width)
            expected = direct_error(x, w, cols, lam)
            got = removal_error(w, gram, cols, lam)
            assert got == pytest.approx(expected, rel=1e-8, abs=1e-8), r


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_removal_of_one_unit_is_the_exhaustive_argmin(layer, seed):
    n_units, width = LAYERS[layer]
    x, w = correlated_layer(n_units, width, seed)
    gram = x.T @ x
    errors = exhaustive(w, gram, n_units, width, 1, ridge_lambda(gram, DAMP))
    best = min(errors, key=errors.__getitem__)
    got = greedy_removal(w, gram, 1, DAMP, width)
    assert got.removed == best
    assert got.error == pytest.approx(errors[best], rel=1e-9)


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("chunk", [1, 2])
def test_greedy_error_is_the_closed_form_error_of_its_set_and_not_below_the_optimum(layer, chunk):
    n_units, width = LAYERS[layer]
    x, w = correlated_layer(n_units, width, seed=3)
    gram = x.T @ x
    lam = ridge_lambda(gram, DAMP)
    for k in range(1, n_units):
        got = greedy_removal(w, gram, k, DAMP, width, chunk=chunk)
        assert len(set(got.removed)) == k
        closed = removal_error(w, gram, unit_columns(list(got.removed), width), lam)
        assert got.error == pytest.approx(closed, rel=1e-9)
        optimum = min(exhaustive(w, gram, n_units, width, k, lam).values())
        assert got.error >= optimum * (1 - 1e-9)  # greedy is no better than the optimum


@pytest.mark.parametrize("layer", LAYERS)
def test_greedy_is_optimal_when_the_units_do_not_interact(layer):
    """Units fed by disjoint token sets: G is block-diagonal, E is additive, greedy is exact."""
    n_units, width = LAYERS[layer]
    g = torch.Generator().manual_seed(4)
    x = torch.zeros(8 * n_units, n_units * width, dtype=torch.float64)
    for u in range(n_units):
        scale = 0.5 + u % 3  # unequal energies, so the order is not trivial
        x[8 * u : 8 * (u + 1), u * width : (u + 1) * width] = scale * torch.randn(
            8, width, generator=g, dtype=torch.float64
        )
    w = torch.randn(5, n_units * width, generator=g, dtype=torch.float64)
    gram = x.T @ x
    lam = ridge_lambda(gram, DAMP)
    for k in range(1, n_units):
        errors = exhaustive(w, gram, n_units, width, k, lam)
        got = greedy_removal(w, gram, k, DAMP, width, chunk=1)
        assert got.error == pytest.approx(min(errors.values()), rel=1e-9)
        assert errors[tuple(sorted(got.removed))] == pytest.approx(min(errors.values()))


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("seed", range(4))
def test_greedy_beats_removing_the_lowest_magnitude_units(layer, seed):
    """Not a guarantee (greedy is not optimal), but what the option is for, on random layers."""
    n_units, width = LAYERS[layer]
    x, w = correlated_layer(n_units, width, seed + 10)
    gram = x.T @ x
    lam = ridge_lambda(gram, DAMP)
    # activation-weighted magnitude ||W_u||^2 * mean G_uu: the unrepaired output energy
    energy = (w.square().sum(0) * gram.diagonal()).view(n_units, width).sum(1)
    for k in range(1, n_units):
        lowest = torch.sort(energy, stable=True).indices[:k]
        baseline = removal_error(w, gram, unit_columns(lowest, width), lam)
        assert greedy_removal(w, gram, k, DAMP, width).error <= baseline * (1 + 1e-9)


def test_downdated_inverse_equals_a_fresh_inverse_and_the_weights_the_ridge_solution():
    x, w = correlated_layer(12, 1, seed=5)
    gram = x.T @ x
    lam = ridge_lambda(gram, DAMP)
    hinv, refit = damped_inverse(gram, lam), w.clone()
    removed: list[int] = []
    for cols in ([3], [7, 0], [10, 5, 1]):  # rank 1, 2, 3 downdates in sequence
        downdate_inverse_(hinv, torch.tensor(cols), refit)
        removed += cols
        kept, rem = split_features([i for i in range(12) if i not in removed], 12)
        h_ss = gram[kept[:, None], kept] + lam * torch.eye(kept.numel(), dtype=gram.dtype)
        torch.testing.assert_close(hinv[kept[:, None], kept], torch.linalg.inv(h_ss))
        assert hinv[rem].abs().max() == 0 and hinv[:, rem].abs().max() == 0
        # (3): W' = W_S + Delta, Delta^T = (G_SS + lam I)^-1 G_SR W_R^T (ridge_refit's solution)
        delta_t = torch.linalg.solve(h_ss, gram[kept[:, None], rem] @ w[:, rem].T)
        torch.testing.assert_close(refit[:, kept], w[:, kept] + delta_t.T)
        assert refit[:, rem].abs().max() == 0


@pytest.mark.parametrize("threads", [1, 2])
def test_block_solve_of_wide_groups_matches_one_solve_per_block(threads):
    # batched LU of 192-wide blocks (SmolLM2's GQA groups) fails on multi-threaded CPU builds
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 192, 192, generator=gen, dtype=torch.float64)
    blocks = a @ a.mT / 192 + 1e-3 * torch.eye(192, dtype=torch.float64)
    blocks[2] = -blocks[2]  # not positive definite: solved alone, by LU
    rhs = torch.randn(3, 192, 7, generator=gen, dtype=torch.float64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = spd_block_solve(blocks, rhs)
    finally:
        torch.set_num_threads(before)
    for u in range(3):
        torch.testing.assert_close(blocks[u] @ got[u], rhs[u], rtol=0, atol=1e-8)


def test_selection_input_errors():
    x, w = correlated_layer(4, 2, seed=0)
    with pytest.raises(GQAPruneError, match="cannot remove"):
        greedy_removal(w, x.T @ x, 5, DAMP, 2)
    with pytest.raises(GQAPruneError, match="do not fit"):
        greedy_removal(w, x.T @ x, 1, DAMP, 3)
    with pytest.raises(GQAPruneError, match="needs --compensation lstsq"):
        RunConfig(compensation="bias", selection="repair")
    with pytest.raises(GQAPruneError, match="unknown selection"):
        prune_model_(
            tiny_model(),
            torch.zeros(1, 4, dtype=torch.long),
            AllocationConfig(0.2, prune_mlp=True),
            selection="best",
        )


# ---- end to end --------------------------------------------------------------------------

IDS = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(7))
ALLOC = AllocationConfig(pruning_ratio=0.3, prune_mlp=True, distribution=(3, 7))
RUN = dict(layer_importance=[1.0, 3.0, 0.5], batch_size=3, progress=False, compensation="lstsq")


def ridge_solution(weight, gram, keep_cols, lam):
    """``W_S + Delta``, ``Delta^T = (G_SS + lam I)^-1 G_SR W_R^T``, by a direct solve."""
    kept, removed = split_features(keep_cols, weight.shape[1])
    w, g = weight.double(), gram.double()
    h_ss = g[kept[:, None], kept] + lam * torch.eye(kept.numel(), dtype=torch.float64)
    delta_t = torch.linalg.solve(h_ss, g[kept[:, None], removed] @ w[:, removed].T)
    return w[:, kept] + delta_t.T


def test_repair_selection_end_to_end(kind, monkeypatch, tmp_path):
    dense = tiny_model(kind)
    score = prune_model_(copy.deepcopy(dense), IDS, ALLOC, **RUN)
    calls = []
    select = sequential_mod.select_kept_units

    def recording(weight, gram, n_keep, damp, width=1, cross=None):
        assert cross is None  # local targets
        kept, columns = select(weight, gram, n_keep, damp, width)
        calls.append((weight.detach().clone(), gram.clone(), width, kept, columns))
        return kept, columns

    monkeypatch.setattr(sequential_mod, "select_kept_units", recording)
    model = copy.deepcopy(dense)
    repair = prune_model_(model, IDS, ALLOC, selection="repair", **RUN)
    monkeypatch.undo()

    # same counts, so the exact target and the Q:KV ratio of the score run
    assert repair.after == score.after
    assert repair.after.queries_per_kv == score.before.queries_per_kv
    assert [(len(a.keep_kv_groups), len(a.keep_mlp_channels)) for a in repair.plan.layers] == [
        (len(b.keep_kv_groups), len(b.keep_mlp_channels)) for b in score.plan.layers
    ]
    assert repair.plan != score.plan  # it really chose other units somewhere
    # the returned plan is the applied one: plain slicing of the dense model to it + the
    # repair run's per-layer choices agree with what the selector returned
    expected = []
    for lp, mine_lp in zip(score.plan.layers, repair.plan.layers, strict=True):
        width = score.plan.queries_per_kv * score.plan.head_dim
        if 0 < len(lp.keep_kv_groups) < score.before.kv_heads[lp.layer_idx]:
            expected.append((width, mine_lp.keep_kv_groups, lp.keep_kv_groups))
        if len(lp.keep_mlp_channels) < score.before.intermediate_sizes[lp.layer_idx]:
            expected.append((1, mine_lp.keep_mlp_channels, lp.keep_mlp_channels))
    assert [(c[2], c[3]) for c in calls] == [(e[0], e[1]) for e in expected]
    # per layer, on the same calibration inputs: the written columns are the ridge refit of
    # the kept set, and the refit's objective (1) is no larger than with the score's units of
    # the same counts (the residual alone may be: the ridge term trades it off)
    for (weight, gram, width, kept, columns), (_, _, by_score) in zip(calls, expected, strict=True):
        lam = ridge_lambda(gram, DAMP)
        torch.testing.assert_close(
            columns.double(), ridge_solution(weight, gram, unit_columns(kept, width), lam)
        )
        n_units = weight.shape[1] // width

        def error(keep, n_units=n_units, width=width, weight=weight, gram=gram, lam=lam):
            gone = [u for u in range(n_units) if u not in keep]
            return removal_error(weight, gram, unit_columns(gone, width), lam)

        assert error(kept) <= error(by_score) * (1 + 1e-9) + 1e-12

    # deterministic
    again = prune_model_(copy.deepcopy(dense), IDS, ALLOC, selection="repair", **RUN)
    assert again.plan == repair.plan
    # streaming == in memory
    streamer = LayerStreamer(copy.deepcopy(dense), StreamingConfig(device="cpu"))
    streamed = prune_model_(
        streamer.model, IDS, ALLOC, streaming=streamer, selection="repair", **RUN
    )
    assert streamed.plan == repair.plan
    assert streamed.after == repair.after
    gathered = streamer.gather_("cpu")
    for (name, p), q in zip(gathered.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    assert get_adapter(model).geometry(model) == repair.after


def test_cli_saves_the_plan_it_applied_and_refuses_repair_without_lstsq(tiny_run, capsys):
    from safetensors.torch import load_file

    from gqa_prune.cli import main
    from gqa_prune.plan import PruningPlan
    from gqa_prune.slicing import group_rows

    from conftest import tiny_args

    args = ("--pruning_ratio", "0.3", "--prune_mlp", "--save_model")
    # the default (auto) is repair with lstsq compensation
    for name, extra in (("score", ("--selection", "score")), ("repair", ())):
        assert main(tiny_args(tiny_run, *args, "--save_ckpt_log_name", name, *extra)) == 0
    plans = {
        n: PruningPlan.load(tiny_run["logs"] / n / "pruning_plan.json") for n in ("score", "repair")
    }
    assert plans["repair"] != plans["score"]
    plan = plans["repair"]
    saved = load_file(tiny_run["logs"] / "repair" / "model" / "model.safetensors")
    dense = tiny_model().state_dict()  # the weights save_tiny_model_dir wrote
    for lp in plan.layers:  # q and gate rows are sliced, never refitted: they name the units
        prefix = f"model.layers.{lp.layer_idx}"
        q = f"{prefix}.self_attn.q_proj.weight"
        rows = group_rows(lp.keep_kv_groups, plan.queries_per_kv * plan.head_dim)
        torch.testing.assert_close(saved[q], dense[q][rows])
        gate = f"{prefix}.mlp.gate_proj.weight"
        torch.testing.assert_close(saved[gate], dense[gate][list(lp.keep_mlp_channels)])

    # auto falls back to score where repair cannot run
    bias = ("--compensation", "bias", "--save_ckpt_log_name", "b")
    assert main(tiny_args(tiny_run, *args, *bias)) == 0
    method = json.loads((tiny_run["logs"] / "b" / "summary.json").read_text())["method"]
    assert method["selection"] == "score" and method["importance"] == "taylor"
    method = json.loads((tiny_run["logs"] / "repair" / "summary.json").read_text())["method"]
    assert method["selection"] == "repair" and method["importance"] is None
    bad = tiny_args(tiny_run, "--selection", "repair", "--compensation", "bias")
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert "--compensation lstsq" in err and "Traceback" not in err
