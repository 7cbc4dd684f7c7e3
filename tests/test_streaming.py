"""Streaming mode (one decoder layer on the device at a time) == in-memory mode, and memory caps."""

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gqa_prune import AllocationConfig, GQAPruneError, prune_model_
from gqa_prune.analysis import compute_layer_importance
from gqa_prune.evaluation.perplexity import evaluate_perplexity
from gqa_prune.importance import compute_unit_scores
from gqa_prune.streaming import (
    STREAMING_SCORERS,
    LayerStreamer,
    StreamingConfig,
    load_model_offloaded,
    parse_memory,
    plan_memory,
    streaming_layer_importance,
    streaming_perplexity,
    streaming_unit_scores,
)

from conftest import save_tiny_model_dir, tiny_args, tiny_model

IDS = torch.randint(0, 128, (5, 16), generator=torch.Generator().manual_seed(3))


def assert_scores_close(a, b):
    for x, y in zip(a.groups + a.channels, b.groups + b.channels):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


@pytest.fixture(params=["ram", "disk"])
def streamed(request, tmp_path):
    """(dense model, the same weights streamed from RAM or from disk)."""

    def make(kind="llama4", **overrides):
        dense = tiny_model(kind, **overrides)
        copy_ = copy.deepcopy(dense)
        offload = str(tmp_path / "offload") if request.param == "disk" else None
        return dense, LayerStreamer(copy_, StreamingConfig(device="cpu", offload_dir=offload))

    return make


def test_every_criterion_has_a_streaming_version():
    from gqa_prune.importance import CRITERIA

    assert set(STREAMING_SCORERS) == set(CRITERIA)


@pytest.mark.parametrize("criterion", ["taylor", "taylor2", "wanda", "magnitude", "random"])
def test_streaming_unit_scores_equal_in_memory(streamed, criterion):
    dense, streamer = streamed("qwen2")  # q/k/v biases exercise the bias terms too
    expected = compute_unit_scores(dense, IDS, criterion, batch_size=2, progress=False)
    got = streaming_unit_scores(streamer, IDS, criterion, batch_size=2, progress=False)
    assert_scores_close(got, expected)


def test_streaming_taylor_equals_full_backward_for_every_layout(kind):
    dense = tiny_model(kind)
    streamer = LayerStreamer(copy.deepcopy(dense), StreamingConfig(device="cpu"))
    aggregation = "max" if kind == "llama4" else "sum"
    expected = compute_unit_scores(dense, IDS, "taylor", aggregation, 3, progress=False)
    got = streaming_unit_scores(streamer, IDS, "taylor", aggregation, 3, progress=False)
    assert_scores_close(got, expected)
    # no gradient is left behind and the trainable flags are untouched
    assert all(p.grad is None and p.requires_grad for p in streamer.model.parameters())


@pytest.mark.parametrize("method", ["removal", "activation", "block_influence"])
def test_streaming_layer_importance_equals_in_memory(streamed, method):
    dense, streamer = streamed()
    expected = compute_layer_importance(dense, IDS, method, batch_size=2, progress=False)
    got = streaming_layer_importance(streamer, IDS, method, batch_size=2, progress=False)
    torch.testing.assert_close(
        torch.tensor(got.scores), torch.tensor(expected.scores), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    ("criterion", "compensation", "store", "extra"),
    [
        ("taylor", "lstsq", "disk", {}),
        ("taylor", "bias", "ram", {}),
        ("wanda", "lstsq", "ram", {}),
        ("wanda", "none", "disk", {}),
        ("taylor", "lstsq", "ram", dict(selection="repair", compensation_target="0.25")),
    ],
)
def test_streaming_pruning_gives_the_same_plan_and_weights(
    tmp_path, criterion, compensation, store, extra
):
    dense = tiny_model(num_hidden_layers=4)
    offload = str(tmp_path / "offload") if store == "disk" else None
    streamer = LayerStreamer(
        copy.deepcopy(dense), StreamingConfig(device="cpu", offload_dir=offload)
    )
    config = AllocationConfig(pruning_ratio=0.3, prune_mlp=True, distribution=(3, 7))
    kwargs = dict(
        layer_importance=[1.0, 3.0, 2.0, 0.5],
        criterion=criterion,
        batch_size=2,
        progress=False,
        compensation=compensation,
        **extra,
    )
    expected = prune_model_(dense, IDS, config, **kwargs)
    got = prune_model_(streamer.model, IDS, config, streaming=streamer, **kwargs)
    assert got.plan == expected.plan
    assert got.after == expected.after
    assert any(len(lp.keep_kv_groups) < 2 for lp in got.plan.layers)  # groups really cut
    tokens = torch.randint(0, 128, (200,), generator=torch.Generator().manual_seed(5))
    ppl_stream = streaming_perplexity(streamer, tokens, seq_len=32, batch_size=2, progress=False)
    ppl_dense = evaluate_perplexity(dense, tokens, seq_len=32, batch_size=2, progress=False)
    assert ppl_stream.num_tokens == ppl_dense.num_tokens
    assert ppl_stream.ppl == pytest.approx(ppl_dense.ppl, rel=1e-5)
    model = streamer.gather_("cpu")
    for (name, p), q in zip(model.state_dict().items(), dense.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_streaming_config_convenience_returns_a_whole_model_on_cpu(tmp_path):
    dense = tiny_model()
    config = AllocationConfig(pruning_ratio=0.25, prune_mlp=True)
    stream = StreamingConfig(device="cpu", offload_dir=str(tmp_path / "off"))
    prune_model_(dense, IDS, config, progress=False, streaming=stream)
    assert all(not p.is_meta for p in dense.parameters())
    assert not list((tmp_path / "off").iterdir())  # the layer files are deleted
    assert torch.isfinite(dense(IDS[:1]).logits).all()


@pytest.mark.parametrize("kind", ["llama4", "gemma3"])  # gemma3: scaled embeddings, buffers
def test_offloaded_loading_equals_ordinary_loading(tmp_path, kind):
    folder = save_tiny_model_dir(tmp_path / "m", kind, tie_word_embeddings=True)
    dense = tiny_model(kind, tie_word_embeddings=True)
    model, tok, streamer = load_model_offloaded(
        str(folder), "float32", StreamingConfig(device="cpu", offload_dir=str(tmp_path / "o"))
    )
    assert tok is not None
    assert all(p.is_meta for p in streamer.layers.parameters())
    assert len(list(streamer.store.path.glob("layer_*.safetensors"))) == 3
    expected = compute_layer_importance(dense, IDS, "removal", progress=False)
    got = streaming_layer_importance(streamer, IDS, "removal", progress=False)
    torch.testing.assert_close(torch.tensor(got.scores), torch.tensor(expected.scores))


@pytest.mark.parametrize("kind", ["gemma3", "gemma2"])
def test_mixed_layer_types_stream_like_in_memory(kind, tmp_path):
    """Sliding and full layers each replay their own mask and rotary tables (window 6 < 16)."""
    dense = tiny_model(kind, num_hidden_layers=4)
    assert len(set(dense.config.layer_types)) == 2
    streamer = LayerStreamer(
        copy.deepcopy(dense), StreamingConfig(device="cpu", offload_dir=str(tmp_path / "o"))
    )
    expected = compute_layer_importance(dense, IDS, "removal", batch_size=2, progress=False)
    got = streaming_layer_importance(streamer, IDS, "removal", batch_size=2, progress=False)
    torch.testing.assert_close(torch.tensor(got.scores), torch.tensor(expected.scores))
    config = AllocationConfig(pruning_ratio=0.3, prune_mlp=True, distribution=(3, 7))
    kwargs = dict(layer_importance=expected.scores, batch_size=2, progress=False)
    want = prune_model_(dense, IDS, config, compensation="lstsq", **kwargs)
    out = prune_model_(
        streamer.model, IDS, config, streaming=streamer, compensation="lstsq", **kwargs
    )
    assert out.plan == want.plan
    tokens = torch.randint(0, 128, (200,), generator=torch.Generator().manual_seed(5))
    ppl_stream = streaming_perplexity(streamer, tokens, seq_len=32, batch_size=2, progress=False)
    ppl_dense = evaluate_perplexity(dense, tokens, seq_len=32, batch_size=2, progress=False)
    assert ppl_stream.ppl == pytest.approx(ppl_dense.ppl, rel=1e-5)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("20GiB", 20 * 2**30), ("500MB", 500 * 10**6), ("1.5e9", 1_500_000_000), (4096, 4096)],
)
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["lots", "-3GB", "0", "12 parsecs"])
def test_parse_memory_rejects_nonsense(text):
    with pytest.raises(GQAPruneError, match="max_memory"):
        parse_memory(text)


def test_a_cap_below_one_layer_is_a_clear_error(tmp_path):
    model = tiny_model(hidden_size=256, intermediate_size=1024, num_hidden_layers=2)
    stream = StreamingConfig(device="cpu", max_memory="1MiB", offload_dir=str(tmp_path))
    with pytest.raises(GQAPruneError, match=r"layer \d needs .* --max_memory allows 1.0 MiB"):
        prune_model_(model, IDS, AllocationConfig(0.2, prune_mlp=True), streaming=stream)
    ram = StreamingConfig(device="cpu", max_memory="6MiB")  # layers in RAM count fully
    with pytest.raises(GQAPruneError, match="--offload_dir"):
        prune_model_(
            tiny_model(hidden_size=256, intermediate_size=1024),
            IDS,
            AllocationConfig(0.2, prune_mlp=True),
            streaming=ram,
        )


def test_the_api_counts_the_compensation_windows_against_the_cap():
    """The recordings of many refit windows rest in RAM beside the layers: the cap sees them."""
    model = tiny_model()
    many = torch.randint(0, 128, (400, 64), generator=torch.Generator().manual_seed(4))
    few = plan_memory(model, 1, 16, "taylor", "lstsq", True, calibration_tokens=IDS.numel())
    full = plan_memory(
        model,
        1,
        16,
        "taylor",
        "lstsq",
        True,
        calibration_tokens=many.numel(),
        compensation_seq_len=64,
    )
    assert full.peak > few.peak
    cap = (few.peak + full.peak) // 2
    config = AllocationConfig(0.2, prune_mlp=True)
    stream = StreamingConfig(device="cpu", max_memory=cap)
    with pytest.raises(GQAPruneError, match="--max_memory allows"):
        prune_model_(model, IDS, config, compensation_ids=many, streaming=stream, progress=False)
    out = prune_model_(tiny_model(), IDS, config, streaming=stream, progress=False)
    assert out.plan


# ---------------------------------------------------------------------- memory cap, measured
# A tiny-but-wide model: 8 layers of hidden 1024 / MLP 2048 (36 MiB fp32 each, 288 MiB in
# all) pruned under a 160 MiB cap with the layers on disk. The test process samples its own
# RSS every millisecond in a thread; malloc returns large blocks to the system at once
# (mallopt), so the RSS follows the live tensors. MARGIN covers what the estimate does not
# model: allocator slack, safetensors read buffers, the tokenizer and the Python objects.
CAP_MIB, MARGIN_MIB = 160, 48

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import ctypes, json, os, sys, threading, time
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)   # M_MMAP_THRESHOLD: fixed, blocks >= 64 KiB are mmapped
    libc.mallopt(-1, 64 * 1024)   # M_TRIM_THRESHOLD
    import torch
    torch.set_num_threads(1)
    from gqa_prune import AllocationConfig, prune_model_
    from gqa_prune.streaming import StreamingConfig, load_model_offloaded

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    folder, offload, cap = sys.argv[1], sys.argv[2], sys.argv[3]
    stream = StreamingConfig(device="cpu", max_memory=cap, offload_dir=offload)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    base = rss()
    peak = [base]
    done = threading.Event()
    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    model, tok, streamer = load_model_offloaded(folder, "float32", stream)
    outcome = prune_model_(
        model, ids, AllocationConfig(pruning_ratio=0.25, prune_mlp=True),
        batch_size=2, progress=False, streaming=streamer,
    )
    done.set(); thread.join()
    print(json.dumps({"growth": peak[0] - base, "removed": outcome.allocation.achieved_ratio,
                      "model_bytes": os.path.getsize(folder + "/model.safetensors")}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_pruning_under_a_memory_cap_smaller_than_the_model(tmp_path):
    folder = save_tiny_model_dir(
        tmp_path / "wide",
        hidden_size=1024,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(folder), str(tmp_path / "off"), f"{CAP_MIB}MiB"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(result)
    assert result["model_bytes"] > 1.7 * CAP_MIB * 2**20  # the whole model is far over the cap
    assert abs(result["removed"] - 0.25) <= 0.005
    assert result["growth"] <= (CAP_MIB + MARGIN_MIB) * 2**20, result


# ---------------------------------------------------------------------- CLI
def test_cli_streaming_run_reports_peak_memory(tiny_run, tmp_path):
    from gqa_prune.cli import main

    rc = main(
        tiny_args(
            tiny_run,
            "--prune_mlp",
            "--streaming",
            "--offload_dir",
            str(tmp_path / "off"),
            "--max_memory",
            "2GiB",
            "--test_after_prune",
            "--save_model",
            "--save_ckpt_log_name",
            "s",
        )
    )
    assert rc == 0
    summary = json.loads((tiny_run["logs"] / "s" / "summary.json").read_text())
    assert summary["peak_memory"]["cpu_max_rss_bytes"] > 0
    assert summary["peak_memory"]["cuda_max_allocated_bytes"] is None
    assert summary["streaming"]["layers_rest_on"] == "disk"
    assert summary["perplexity"]["after"]["num_tokens"] > 0
    assert (tiny_run["logs"] / "s" / "model" / "config.json").is_file()
    assert not list((tmp_path / "off").iterdir())  # offloaded layers cleaned up
    # the same run in memory gives the same plan
    assert main(tiny_args(tiny_run, "--prune_mlp", "--save_ckpt_log_name", "d")) == 0
    plans = [json.loads((tiny_run["logs"] / n / "pruning_plan.json").read_text()) for n in "sd"]
    assert plans[0] == plans[1]


def test_cli_streaming_refuses_steps_that_need_the_whole_model(tiny_run, capsys):
    from cli_helpers import assert_one_error_line

    from gqa_prune.cli import main

    rc = main(tiny_args(tiny_run, "--streaming", "--measure_speed"))
    assert_one_error_line(capsys, rc, "--measure_speed")
    rc = main(tiny_args(tiny_run, "--max_memory", "1KiB"))
    assert_one_error_line(capsys, rc, "--max_memory allows")


@pytest.mark.parametrize("compensation", ["lstsq", "bias"])
def test_streaming_removes_whole_attention_blocks_like_in_memory(tmp_path, compensation):
    dense = tiny_model(num_hidden_layers=4)
    streamer = LayerStreamer(
        copy.deepcopy(dense), StreamingConfig(device="cpu", offload_dir=str(tmp_path))
    )
    geom = streamer.adapter.geometry(dense)
    ratio = 6 * geom.params_per_group / geom.total_params  # layer 0 loses all its groups
    config = AllocationConfig(ratio, alpha=6.0, allow_attention_removal=True, prune_mlp=False)
    kwargs = dict(layer_importance=[0.0, 1.0, 2.0, 3.0], progress=False, compensation=compensation)
    expected = prune_model_(dense, IDS, config, **kwargs)
    got = prune_model_(streamer.model, IDS, config, streaming=streamer, **kwargs)
    assert got.plan == expected.plan and got.after.kv_heads[0] == 0
    # a model with a removed block streams again (layer files hold the stand-in's weights)
    again = streaming_layer_importance(streamer, IDS, "activation", progress=False)
    model = streamer.gather_("cpu")
    for (name, p), q in zip(model.state_dict().items(), dense.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    reference = compute_layer_importance(dense, IDS, "activation", progress=False)
    torch.testing.assert_close(torch.tensor(again.scores), torch.tensor(reference.scores))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_accumulate_scores_in_fp32(dtype):
    """bf16/fp16 weights: scores come back fp32 and agree with the in-memory run."""
    dense = tiny_model("llama4").to(dtype)
    streamer = LayerStreamer(copy.deepcopy(dense), StreamingConfig(device="cpu"))
    expected = compute_unit_scores(dense, IDS, "taylor", batch_size=2, progress=False)
    got = streaming_unit_scores(streamer, IDS, "taylor", batch_size=2, progress=False)
    for x, y in zip(got.groups + got.channels, expected.groups + expected.channels):
        assert x.dtype == torch.float32 and torch.isfinite(x).all()
        # the two paths round half-precision gradients in different orders
        torch.testing.assert_close(x, y, rtol=0.05, atol=1e-3 * float(y.abs().max()))
    outcome = prune_model_(
        streamer.model,
        IDS,
        AllocationConfig(0.2, prune_mlp=True),
        progress=False,
        streaming=streamer,
    )
    assert outcome.after.total_params < outcome.before.total_params
    assert next(streamer.model.parameters()).dtype == dtype
