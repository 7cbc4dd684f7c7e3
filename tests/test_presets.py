"""``--preset``: a named bundle of settings under the flags a user gives explicitly."""

import json
import sys
from pathlib import Path

import pytest
from cli_helpers import assert_one_error_line

from gqa_prune.cli import config_from_args, main
from gqa_prune.config import PRESETS, RunConfig
from gqa_prune.errors import GQAPruneError

from conftest import tiny_args

KNOWLEDGE = PRESETS["knowledge"]


def test_the_knowledge_preset_sets_each_of_its_settings():
    default = config_from_args([])
    chosen = config_from_args(["--preset", "knowledge"])
    for name, value in KNOWLEDGE.items():
        assert getattr(chosen, name) == value
        assert getattr(default, name) != value  # each one changes something
    assert chosen.command == ["gqa-prune", "--preset", "knowledge"]


def test_flags_given_explicitly_override_the_preset_wherever_they_stand():
    for argv in (
        ["--preset", "knowledge", "--compensation_samples", "64"],
        ["--compensation_samples", "64", "--preset", "knowledge"],
    ):
        config = config_from_args(argv)
        assert config.compensation_samples == 64
        assert config.pruning_mode == "sensitivity" and config.compensation_target == "0.25"


def test_from_preset_equals_the_command_line():
    api = RunConfig.from_preset("knowledge", compensation_samples=32, pruning_ratio=0.3)
    cli = config_from_args(
        ["--preset", "knowledge", "--compensation_samples", "32", "--pruning_ratio", "0.3"]
    )
    assert api.to_dict() | {"command": []} == cli.to_dict() | {"command": []}
    assert RunConfig.from_preset("default") == RunConfig()


def test_an_unknown_preset_is_refused(tiny_run, capsys):
    with pytest.raises(SystemExit) as exc:  # argparse's refusal, as for every flag
        main(tiny_args(tiny_run, "--preset", "fast", "--save_ckpt_log_name", "bad"))
    assert_one_error_line(capsys, exc.value.code, "--preset: invalid choice: 'fast'")
    assert not (tiny_run["logs"] / "bad").exists()
    with pytest.raises(GQAPruneError, match="unknown preset 'fast'; choose one of default"):
        RunConfig.from_preset("fast")


def test_the_knowledge_preset_prunes_a_tiny_model(tiny_run):
    flags = "--preset knowledge --prune_mlp --compensation_samples 3 --save_ckpt_log_name k"
    argv = tiny_args(tiny_run, *flags.split())
    assert main(argv) == 0
    summary = json.loads((tiny_run["logs"] / "k" / "summary.json").read_text())
    method = summary["method"]
    assert method["allocation"] == "sensitivity"
    assert method["sensitivity_weights"] == "gradient"
    assert method["compensation_target"] == "0.25"
    assert method["compensation_windows"] == [3, 32]
    assert abs(summary["actual_ratio_total"] - summary["target_ratio"]) <= 0.005


def test_the_bench_preset_is_the_library_preset():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_quality import method_settings

    s = "sensitivity-grad@compensation_target=0.25@compensation_samples=256"
    assert method_settings("knowledge") == method_settings(s) == KNOWLEDGE
