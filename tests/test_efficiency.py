"""Efficiency figures on a tiny model: sane, positive, and smaller after pruning."""

import sys

import pytest
import torch
from cli_helpers import assert_one_error_line

from gqa_prune.allocation import AllocationConfig
from gqa_prune.cli import main
from gqa_prune.errors import GQAPruneError
from gqa_prune.evaluation.efficiency import (
    checkpoint_size_bytes,
    format_speed_table,
    measure_speed,
    speedup,
)
from gqa_prune.models.checkpoint import save_pruned
from gqa_prune.pipeline import prune_model_

from conftest import char_tokenizer, save_tiny_model_dir, tiny_model

FAST = dict(prompt_len=16, new_tokens=3, repeats=1, warmup=0)


def pruned_tiny(ratio=0.4):
    model = tiny_model("llama4", num_hidden_layers=2)
    ids = torch.randint(0, 128, (2, 16))
    prune_model_(
        model, ids, AllocationConfig(pruning_ratio=ratio), criterion="magnitude", progress=False
    )
    return model


def test_speed_of_dense_and_pruned(tmp_path):
    dense = tiny_model("llama4", num_hidden_layers=2)
    pruned = pruned_tiny()
    ckpt = save_pruned(pruned, char_tokenizer(), tmp_path / "pruned")
    a = measure_speed(dense.train(), label="dense", **FAST)
    b = measure_speed(pruned, label="pruned", checkpoint=ckpt, **FAST)
    assert dense.training  # mode restored
    for r in (a, b):
        assert r.prefill_tokens_per_s > 0 and r.decode_tokens_per_s > 0
        assert r.peak_memory_bytes > 2**20  # a Python process with torch is MiBs at least
        assert (r.prompt_len, r.new_tokens, r.batch_size, r.device) == (16, 3, 1, "cpu")
    if sys.platform == "linux":
        assert a.memory_kind == "cpu_peak_rss"
    assert b.params < a.params == sum(p.numel() for p in dense.parameters())
    assert (a.size_source, a.size_bytes) == ("estimate", 4 * a.params)  # float32
    assert b.size_source == "disk" and b.size_bytes == checkpoint_size_bytes(ckpt)
    # the safetensors file holds the weights plus a small header
    assert 4 * b.params <= b.size_bytes < 4 * b.params + 65536
    ratios = speedup(a, b)
    assert ratios["params"] == pytest.approx(b.params / a.params) and ratios["params"] < 1
    table = format_speed_table([a, b])
    assert "pruned / dense" in table and "decode tokens/s" in table
    assert f"{b.params:,}" in table


def test_decode_loop_matches_greedy_generation():
    """The timed decode loop is the real thing: its cached steps give the greedy tokens."""
    from gqa_prune.evaluation.efficiency import _decode

    model = pruned_tiny()
    prompt = torch.randint(0, 128, (1, 10))
    seen = []
    hook = model.register_forward_hook(lambda m, i, out: seen.append(out.logits[:, -1].argmax(-1)))
    with torch.no_grad():
        _decode(model, prompt, 5)()
        hook.remove()
        ids = prompt
        for _ in range(6):  # no cache: recompute the whole sequence each step
            nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], 1)
    assert torch.equal(torch.stack(seen, 1)[0], ids[0, 10:])


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(prompt_len=250, new_tokens=10), "exceeds the model's 256 positions"),
        (dict(prompt_len=0), "--prompt_len must be a positive integer"),
        (dict(repeats=2.5), "--repeats must be a positive integer"),
        (dict(warmup=-1), "--warmup must be an integer >= 0"),
    ],
)
def test_bad_settings(kwargs, words):
    with pytest.raises(GQAPruneError, match=words):
        measure_speed(tiny_model(), **kwargs)


def test_checkpoint_without_weights(tmp_path):
    with pytest.raises(GQAPruneError, match="no weight file"):
        checkpoint_size_bytes(tmp_path)


def test_bench_speed_command(tmp_path, capsys):
    dense_dir = save_tiny_model_dir(tmp_path / "dense", num_hidden_layers=2)
    save_pruned(pruned_tiny(), char_tokenizer(), tmp_path / "pruned")
    out_json = tmp_path / "speed.json"
    rc = main(
        [
            "bench-speed",
            "--base_model",
            str(dense_dir),
            "--pruned",
            str(tmp_path / "pruned"),
            "--device",
            "cpu",
            "--prompt_len",
            "16",
            "--new_tokens",
            "3",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--output",
            str(out_json),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "pruned / dense" in out and "decode tokens/s" in out
    import json

    data = json.loads(out_json.read_text())
    assert data["pruned"]["params"] < data["dense"]["params"]
    assert data["dense"]["size_source"] == data["pruned"]["size_source"] == "disk"
    assert data["pruned_over_dense"]["params"] < 1


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--pruned", "/nonexistent"], "is not a folder"),
        (["--pruned", "{tmp}", "--prompt_len", "0"], "--prompt_len must be a positive integer"),
    ],
)
def test_bench_speed_bad_input(tmp_path, capsys, extra, words):
    dense_dir = save_tiny_model_dir(tmp_path / "dense", num_hidden_layers=2)
    if "{tmp}" in extra:
        save_pruned(pruned_tiny(), char_tokenizer(), tmp_path / "pruned")
        extra = [str(tmp_path / "pruned") if e == "{tmp}" else e for e in extra]
    rc = main(["bench-speed", "--base_model", str(dense_dir), "--device", "cpu", *extra])
    assert_one_error_line(capsys, rc, words)
