"""Layer importance: fast removal == naive removal, statistics == hand computations, files."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from gqa_prune.analysis.decoder_stack import (
    OutputHead,
    next_token_nll,
    run_layers,
    trace_decoder_stack,
)
from gqa_prune.analysis.layer_importance import (
    LayerImportance,
    LayerImportanceAnalyzer,
    compute_layer_importance,
    load_layer_importance,
    model_identity,
    removal_importance_naive,
)
from gqa_prune.errors import GQAPruneError

from conftest import KINDS, tiny_model

# A larger init than HF's 0.02 so that layers change the loss visibly and differently.
INIT = 0.2


def _model(kind: str = "llama4", **overrides):
    return tiny_model(kind, initializer_range=INIT, **overrides)


@pytest.fixture
def calib():
    torch.manual_seed(2)
    return torch.randint(0, 128, (5, 12))  # 5 samples: batches of 2 leave a ragged last one


@pytest.mark.parametrize("kind", KINDS)
def test_fast_removal_equals_naive(kind, calib):
    model = _model(kind)
    fast = compute_layer_importance(model, calib, "removal", batch_size=2, progress=False)
    naive = removal_importance_naive(model, calib, batch_size=2, progress=False)
    torch.testing.assert_close(
        torch.tensor(fast.extra["loss_without_layer"]),
        torch.tensor(naive.extra["loss_without_layer"]),
        rtol=1e-5,
        atol=1e-6,
    )
    assert fast.extra["base_loss"] == pytest.approx(naive.extra["base_loss"], rel=1e-6)
    torch.testing.assert_close(
        torch.tensor(fast.scores), torch.tensor(naive.scores), rtol=1e-4, atol=1e-5
    )
    # the comparison is meaningful only if skipping layers changes the loss, and differently
    losses = fast.extra["loss_without_layer"]
    assert max(abs(x - fast.extra["base_loss"]) for x in losses) > 1e-2
    assert max(losses) - min(losses) > 1e-3


def test_skipping_a_layer_equals_deleting_it(calib):
    model = _model("llama4")
    result = compute_layer_importance(model, calib, "removal", batch_size=3, progress=False)
    for skipped in range(model.config.num_hidden_layers):
        pruned = _model("llama4")
        del pruned.model.layers[skipped]
        pruned.config.num_hidden_layers -= 1
        with torch.no_grad():
            loss = float(pruned(input_ids=calib, labels=calib, use_cache=False).loss)
        assert result.extra["loss_without_layer"][skipped] == pytest.approx(loss, rel=1e-5)


@pytest.mark.parametrize("kind", ["llama4", "qwen2", "gemma2", "gemma3"])  # gemma2: soft-caps
def test_stack_runner_reproduces_model_output(kind, calib):
    model = _model(kind)
    with torch.no_grad():
        out = model(input_ids=calib, labels=calib, use_cache=False)
        trace = trace_decoder_stack(model, calib)
        layers = model.model.layers
        hidden = run_layers(layers, trace.calls, trace.inputs[0], 0)
        head = OutputHead(model)
        torch.testing.assert_close(hidden, trace.output)
        torch.testing.assert_close(head(hidden), out.logits, rtol=1e-5, atol=1e-5)
        mean_nll = next_token_nll(head, hidden, calib) / (calib.shape[0] * (calib.shape[1] - 1))
    assert mean_nll == pytest.approx(float(out.loss), rel=1e-5)


def test_removal_extra_is_consistent(calib):
    result = compute_layer_importance(_model("qwen2"), calib, "removal", progress=False)
    extra = result.extra
    assert extra["base_ppl"] == pytest.approx(math.exp(extra["base_loss"]))
    assert extra["ppl_without_layer"] == pytest.approx(
        [math.exp(x) for x in extra["loss_without_layer"]]
    )
    assert result.scores == pytest.approx(
        [x - extra["base_loss"] for x in extra["loss_without_layer"]]
    )
    assert extra["num_tokens"] == 5 * 11
    assert (result.num_samples, result.seq_len, result.num_layers) == (5, 12, 3)


@pytest.mark.parametrize("method", ["removal", "activation", "block_influence"])
def test_batch_size_does_not_change_scores(method, calib):
    model = _model("llama3")
    one = compute_layer_importance(model, calib, method, batch_size=1, progress=False)
    all_ = compute_layer_importance(model, calib, method, batch_size=5, progress=False)
    # removal scores are differences of two fp32 losses near 5: compare to 2e-6 absolute
    assert one.scores == pytest.approx(all_.scores, rel=1e-5, abs=2e-6)
    assert max(all_.scores) - min(all_.scores) > 1e-3


@pytest.mark.parametrize("kind", ["llama4", "qwen2"])
def test_statistics_match_hand_computation(kind, calib):
    model = _model(kind)
    n_layers = model.config.num_hidden_layers
    act = compute_layer_importance(model, calib, "activation", batch_size=2, progress=False)
    bi = compute_layer_importance(model, calib, "block_influence", batch_size=2, progress=False)
    for result in (act, bi):
        assert len(result.scores) == result.num_layers == n_layers
        assert all(math.isfinite(s) for s in result.scores)
    with torch.no_grad():
        states = model(input_ids=calib, output_hidden_states=True).hidden_states
    # hidden_states[-1] is taken after the final norm, so compare the layers before the last
    for layer in range(n_layers - 1):
        x_in, x_out = states[layer].float(), states[layer + 1].float()
        expected_bi = 1 - F.cosine_similarity(x_in, x_out, dim=-1).mean()
        assert bi.scores[layer] == pytest.approx(float(expected_bi), rel=1e-5)
        assert act.scores[layer] == pytest.approx(float(x_out.norm(dim=-1).mean()), rel=1e-5)
    assert 0 < min(bi.scores) and max(bi.scores) < 2


def test_analyzer_is_compute_layer_importance(calib):
    model = _model("llama4")
    model.train()
    result = LayerImportanceAnalyzer(
        model, "block_influence", batch_size=2, progress=False
    ).analyze(calib)
    assert model.training  # mode restored
    expected = compute_layer_importance(model, calib, "block_influence", progress=False)
    assert result.scores == pytest.approx(expected.scores)
    assert result.method == "block_influence"


def test_unknown_method_lists_valid_names(calib):
    with pytest.raises(GQAPruneError, match="removal, activation, block_influence"):
        compute_layer_importance(_model(), calib, "taylor")
    with pytest.raises(GQAPruneError, match="unknown layer importance method 'magnitude'"):
        LayerImportanceAnalyzer(_model(), method="magnitude")


@pytest.mark.parametrize(
    "bad",
    [torch.zeros(12, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 12)],
)
def test_bad_input_ids_are_refused(bad):
    with pytest.raises(GQAPruneError, match="layer importance needs"):
        compute_layer_importance(_model(), bad, progress=False)


def test_non_finite_scores_name_the_step(calib):
    model = _model()
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("nan")
    with pytest.raises(GQAPruneError, match=r"layer importance \(removal\): non-finite"):
        compute_layer_importance(model, calib, progress=False)


# ------------------------------------------------------------------------------- files
@pytest.fixture
def saved(tmp_path, calib):
    model = _model("llama4")
    result = compute_layer_importance(model, calib, "removal", progress=False)
    path = tmp_path / "layer_importance_config.json"
    result.save(path)
    return model, result, path


def test_json_round_trip(saved):
    model, result, path = saved
    loaded = load_layer_importance(path, model=model)
    assert loaded == result
    assert LayerImportance.from_dict(json.loads(json.dumps(result.to_dict()))) == result
    assert loaded.model_identity == model_identity(model)
    assert model_identity(model)["num_key_value_heads"] == 2


def _rewrite(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda p: p.unlink(), "no layer importance file"),
        (lambda p: p.write_text("{not json"), "is not valid JSON"),
        (lambda p: p.write_text("[1, 2, 3]"), "expected a JSON object"),
        (lambda p: _rewrite(p, scores=None), "'scores' must be a list"),
        (
            lambda p: _rewrite(p, scores=[0.1, float("nan"), 0.2]),
            r"non-finite scores for layers \[1\]",
        ),
        (lambda p: _rewrite(p, scores=[0.1, 0.2]), "2 scores for num_layers=3"),
        (lambda p: _rewrite(p, method="fisher"), "unknown method 'fisher'"),
        (lambda p: _rewrite(p, num_samples=0), "num_samples must be a positive integer"),
    ],
)
def test_malformed_file_is_refused(saved, corrupt, message):
    model, _, path = saved
    corrupt(path)
    with pytest.raises(GQAPruneError, match=message) as info:
        load_layer_importance(path, model=model)
    assert "re-run without --skip_importance_analysis" in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_field_is_refused(saved):
    model, _, path = saved
    data = json.loads(path.read_text())
    del data["seq_len"]
    path.write_text(json.dumps(data))
    with pytest.raises(GQAPruneError, match=r"missing fields \['seq_len'\]"):
        load_layer_importance(path)


@pytest.mark.parametrize(
    "kind, overrides, field",
    [
        ("llama4", {"hidden_size": 64}, "hidden_size 48 vs 64"),
        ("llama4", {"num_hidden_layers": 4}, "num_hidden_layers 3 vs 4"),
        ("llama3", {}, "num_attention_heads 8 vs 6"),
        ("llama4", {"intermediate_size": 80}, "intermediate_size 96 vs 80"),
        (
            "qwen2",
            {"num_attention_heads": 8, "num_key_value_heads": 2},
            "model_type llama vs qwen2",
        ),
    ],
)
def test_result_of_another_model_is_refused(saved, kind, overrides, field):
    _, _, path = saved
    other = tiny_model(kind, **overrides)
    with pytest.raises(GQAPruneError, match=field) as info:
        load_layer_importance(path, model=other)
    assert "measured on another model" in str(info.value)


def test_only_a_different_name_warns(saved, caplog):
    model, result, path = saved
    model.config.name_or_path = "somewhere/else"
    with caplog.at_level(logging.WARNING):
        loaded = load_layer_importance(path, model=model)
    assert loaded.scores == result.scores
    assert "somewhere/else" in caplog.text
