"""Bad input through the real CLI entry point: one line, exit 2, no traceback, nothing written."""

import json

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from gqa_prune.cli import main

from conftest import char_tokenizer, tiny_args


def _gpt2_dir(tmp_path):
    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128)).save_pretrained(
        path
    )
    char_tokenizer().save_pretrained(path)
    return str(path)


def _json_file(tmp_path, content):
    path = tmp_path / "importance.json"
    path.write_text(content)
    return str(path)


def _mismatched_importance(tmp_path):
    """A valid layer importance of a differently shaped model."""
    import torch

    from gqa_prune.analysis import compute_layer_importance

    from conftest import tiny_model

    other = tiny_model("llama4", num_hidden_layers=2)
    result = compute_layer_importance(
        other, torch.randint(0, 96, (1, 8)), "activation", progress=False
    )
    path = tmp_path / "other.json"
    result.save(path)
    return str(path)


def _empty_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n")
    return str(path)


def _under_a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    return str(path / "logs")


# (id, extra args or a function (run, tmp_path) -> args, words the message must contain)
CASES = [
    ("missing_model", lambda r, t: ["--base_model", str(t / "nope")], "not found"),
    ("model_folder_without_config", lambda r, t: ["--base_model", str(t)], "no config.json"),
    ("unknown_builtin", lambda r, t: ["--base_model", "smollm9-1b"], "built-in"),
    ("model_without_gqa_projections", lambda r, t: ["--base_model", _gpt2_dir(t)], "not supported"),
    ("ratio_zero", ["--pruning_ratio", "0"], "--pruning_ratio"),
    ("ratio_above_one", ["--pruning_ratio", "1.5"], "--pruning_ratio"),
    ("ratio_not_a_number", ["--pruning_ratio", "abc"], "invalid float"),
    (
        "min_above_max",
        ["--min_pruning_rate", "0.6", "--max_pruning_rate", "0.3"],
        "max_pruning_rate",
    ),
    ("start_after_end", ["--layer_start", "2", "--layer_end", "1"], "--layer_start"),
    ("end_out_of_range", ["--layer_end", "10"], "out of range"),
    ("start_out_of_range", ["--layer_start", "5"], "out of range"),
    ("freeze_all_layers", ["--freeze_top_n_layers", "3"], "--freeze_top_n_layers"),
    ("distribution_malformed", ["--pruning_distribution", "2-8"], "a:m"),
    ("distribution_zero", ["--pruning_distribution", "0:0"], "not both zero"),
    ("skip_without_config", ["--skip_importance_analysis"], "--layer_importance_config"),
    (
        "corrupt_importance_json",
        lambda r, t: [
            "--skip_importance_analysis",
            "--layer_importance_config",
            _json_file(t, "{not json"),
        ],
        "not valid JSON",
    ),
    (
        "malformed_importance_json",
        lambda r, t: [
            "--skip_importance_analysis",
            "--layer_importance_config",
            _json_file(t, json.dumps({"method": "removal"})),
        ],
        "missing",
    ),
    (
        "mismatched_importance_json",
        lambda r, t: [
            "--skip_importance_analysis",
            "--layer_importance_config",
            _mismatched_importance(t),
        ],
        "another model",
    ),
    (
        "missing_data_file",
        lambda r, t: ["--calibration_dataset", str(t / "none.txt")],
        "neither a file",
    ),
    ("empty_text", lambda r, t: ["--eval_dataset", _empty_file(t), "--test_after_prune"], "empty"),
    ("seq_len_above_model_max", ["--eval_seq_len", "4096", "--test_after_prune"], "maximum"),
    (
        "unreachable_target",
        ["--pruning_ratio", "0.6", "--layer_start", "0", "--layer_end", "1", "--prune_mlp"],
        "at most",
    ),
    ("output_not_writable", lambda r, t: ["--log_root", _under_a_file(t)], "writable"),
    ("gqa_ratio_contradicts_config", ["--gqa_ratio", "3"], "--gqa_ratio"),
    ("head_dim_contradicts_config", ["--head_dim", "128"], "--head_dim"),
    ("unknown_importance", ["--importance", "fisher"], "invalid choice"),
    ("unknown_strategy", ["--pruning_strategy", "greedy"], "invalid choice"),
    ("negative_samples", ["--channel_importance_samples", "-1"], "positive"),
    ("negative_layer_samples", ["--layer_importance_samples", "0"], "positive"),
    ("bad_log_name", ["--save_ckpt_log_name", "a/b"], "plain folder name"),
]


@pytest.mark.parametrize("case_id,extra,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_cleanly(case_id, extra, words, tiny_run, tmp_path, capsys):
    args = extra(tiny_run, tmp_path) if callable(extra) else extra
    with pytest.raises(SystemExit) as exc_info:
        raise SystemExit(main(tiny_args(tiny_run, "--save_ckpt_log_name", "bad", *args)))
    assert exc_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("gqa-prune: error:")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0], err  # one line, last
    assert words.lower() in errors[0].lower(), err
    # nothing half-written: no experiment folder appeared
    assert not (tiny_run["logs"] / "bad").exists()
