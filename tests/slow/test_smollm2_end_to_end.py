"""SmolLM2-135M pruned by 25% through the real CLI entry point, then reloaded both ways."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from gqa_prune.cli import main
from gqa_prune.models.checkpoint import load_pruned

pytestmark = pytest.mark.slow


def test_smollm2_25_percent_end_to_end(real_prereqs, tmp_path, capsys):
    rc = main(
        [
            "--base_model",
            "smollm2-135m",
            "--pruning_ratio",
            "0.25",
            "--prune_mlp",
            "--save_model",
            "--test_original_ppl",
            "--test_after_prune",
            "--channel_importance_samples",
            "4",
            "--taylor_seq_len",
            "64",
            "--compensation_seq_len",
            "64",
            "--eval_max_windows",
            "4",
            "--log_root",
            str(tmp_path),
            "--save_ckpt_log_name",
            "smollm2_25",
            "--data_dir",
            real_prereqs,
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "perplexity after" in out
    exp = tmp_path / "smollm2_25"
    summary = json.loads((exp / "summary.json").read_text())
    assert abs(summary["actual_ratio_total"] - 0.25) <= 0.01
    assert summary["gqa_ratio"] == 3 and summary["gqa_ratio_kept_in_every_layer"]
    before, after = summary["perplexity"]["before"], summary["perplexity"]["after"]
    assert before["dataset"] == "wikitext2" and before["num_tokens"] > 0
    assert 1 < before["ppl"] < after["ppl"] < 1e5  # pruning costs quality, stays finite
    for layer in summary["layers"]:
        assert layer["q_heads"] == 3 * layer["kv_heads"] >= 3

    model, tok = load_pruned(exp / "model", device="cpu")
    remote = AutoModelForCausalLM.from_pretrained(exp / "model", trust_remote_code=True).eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, remote(input_ids=ids).logits
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b)
    assert model.generate(ids, max_new_tokens=5, do_sample=False).shape[1] == ids.shape[1] + 5
