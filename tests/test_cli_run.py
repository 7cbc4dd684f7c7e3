"""The CLI end to end on a tiny model: experiment folder, determinism, resume, overwrite."""

import json

import torch
from safetensors.torch import load_file

from gqa_prune.cli import main

from conftest import tiny_args


def run(tiny_run, *extra):
    return main(tiny_args(tiny_run, *extra))


def test_full_run_writes_the_experiment_folder(tiny_run, capsys):
    rc = run(
        tiny_run,
        "--pruning_ratio",
        "0.3",
        "--prune_mlp",
        "--save_model",
        "--test_original_ppl",
        "--test_after_prune",
        "--save_ckpt_log_name",
        "exp",
    )
    assert rc == 0
    exp = tiny_run["logs"] / "exp"
    names = {p.name for p in exp.iterdir()}
    assert {
        "description.txt",
        "layer_importance_config.json",
        "pruning_strategy.png",
        "pruning_plan.json",
        "summary.json",
        "model",
    } <= names
    run_dirs = [p for p in exp.iterdir() if p.is_dir() and p.name != "model"]
    assert len(run_dirs) == 1
    assert (run_dirs[0] / "training.log").read_text().strip()
    assert "--pruning_ratio 0.3" in (run_dirs[0] / "train.sh").read_text()
    summary = json.loads((exp / "summary.json").read_text())
    assert abs(summary["actual_ratio_total"] - 0.3) <= 0.005
    assert summary["perplexity"]["after"]["num_tokens"] > 0
    assert "pruning_ratio: 0.3" in (exp / "description.txt").read_text()
    out = capsys.readouterr().out
    assert "parameters after" in out and "perplexity before" in out


def test_same_seed_gives_identical_weights(tiny_run):
    for name in ("a", "b"):
        assert run(tiny_run, "--prune_mlp", "--save_model", "--save_ckpt_log_name", name) == 0
    wa = load_file(tiny_run["logs"] / "a" / "model" / "model.safetensors")
    wb = load_file(tiny_run["logs"] / "b" / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_saved_model_is_not_overwritten_and_importance_is_reused(tiny_run, caplog, capsys):
    args = ("--prune_mlp", "--save_model", "--save_ckpt_log_name", "x")
    assert run(tiny_run, *args) == 0
    model_file = tiny_run["logs"] / "x" / "model" / "model.safetensors"
    stamp = model_file.stat().st_mtime_ns
    assert run(tiny_run, *args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert model_file.stat().st_mtime_ns == stamp
    assert run(tiny_run, *args, "--overwrite") == 0
    log_files = sorted((tiny_run["logs"] / "x").glob("*/training.log"))
    assert "reusing the cached" in log_files[-1].read_text()


def test_skip_importance_analysis_reuses_a_file(tiny_run):
    assert run(tiny_run, "--prune_mlp", "--save_ckpt_log_name", "first") == 0
    saved = tiny_run["logs"] / "first" / "layer_importance_config.json"
    rc = run(
        tiny_run,
        "--prune_mlp",
        "--save_ckpt_log_name",
        "second",
        "--skip_importance_analysis",
        "--layer_importance_config",
        str(saved),
    )
    assert rc == 0
    second = json.loads((tiny_run["logs"] / "second" / "layer_importance_config.json").read_text())
    assert second == json.loads(saved.read_text())
