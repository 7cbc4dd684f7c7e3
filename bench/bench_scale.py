"""Pruning a Llama-3-8B-shaped model: wall time and peak memory, in memory vs streaming.

The model is built from a ``LlamaConfig`` with random weights directly in bf16 on the
device (no download); calibration tokens are random. Each mode runs the full pruning step
with the run defaults (``RunConfig``: removal layer importance on 8 x 128 tokens, Taylor on
32 x 128, inverse allocation alpha 2, split 1:9, MLP pruned, lstsq compensation on
64 x 128, batch 4) at 25% of all parameters, and prints one table row per mode:

    mode       in memory: the whole model on the device (gqa_prune.prune_model_)
               streaming: decoder layers in CPU RAM, one at a time on the device
    seconds    layer importance, unit scores, compensation (+ allocation), total
    peak       torch.cuda.max_memory_allocated after the model is built (CPU: peak RSS
               above the process before the model was built), and its ratio to the bf16
               weight bytes of the dense model

    python bench/bench_scale.py --device cuda                      # Llama-3-8B shape
    python bench/bench_scale.py --device cpu --layers 2 --hidden 256 --intermediate 512 \\
        --vocab 1024 --q_heads 8 --kv_heads 2 --head_dim 32 --samples 4 --li_samples 2 \\
        --comp_samples 4                                           # smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch

import gqa_prune.pipeline as dense_pipeline
import gqa_prune.planning as planning
import gqa_prune.streaming.pipeline as stream_pipeline
from gqa_prune import prune_model_
from gqa_prune.analysis import compute_layer_importance
from gqa_prune.config import RunConfig
from gqa_prune.runner import allocation_config
from gqa_prune.streaming import LayerStreamer, StreamingConfig, streaming_layer_importance
from gqa_prune.streaming.memory import cpu_peak_rss

GIB = 2**30


def build_model(args: argparse.Namespace, device: torch.device) -> Any:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.q_heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with device:  # weights are created (and randomly initialised) on the device
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.to(device).eval()


class Timer:
    """Wall seconds of named steps; CUDA is synchronised at both ends."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds = device, {}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def step(self, name: str):
        self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def wrap(self, module: Any, attr: str, name: str) -> Callable[[], None]:
        """Time every call of ``module.attr`` as step ``name``; returns an undo function."""
        original = getattr(module, attr)

        def timed(*a: Any, **k: Any) -> Any:
            with self.step(name):
                return original(*a, **k)

        setattr(module, attr, timed)
        return lambda: setattr(module, attr, original)


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            pass


def current_rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


def peak(device: torch.device, cpu_start: int) -> int:
    """CUDA: max_memory_allocated since the reset. CPU: peak RSS above ``cpu_start``."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return cpu_peak_rss() - cpu_start


def run_mode(mode: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    defaults = RunConfig(prune_mlp=True, pruning_ratio=args.ratio)
    gen = torch.Generator().manual_seed(0)
    vocab, seq = args.vocab, defaults.taylor_seq_len
    calib = torch.randint(0, vocab, (args.samples, seq), generator=gen)
    li_ids = torch.randint(0, vocab, (args.li_samples, seq), generator=gen)
    comp_ids = torch.randint(0, vocab, (args.comp_samples, seq), generator=gen)
    batch = defaults.taylor_batch_size

    timer = Timer(device)
    reset_peak(device)
    cpu_start = current_rss()  # CPU: the process (Python, torch) before the model exists
    with timer.step("build"):
        model = build_model(args, device)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        streamer = None
        if mode == "streaming":  # layers go to CPU RAM, the rest stays on the device
            streamer = LayerStreamer(model, StreamingConfig(device=str(device)))
    if device.type == "cuda":  # CPU keeps the build in its peak: the weights are the model
        reset_peak(device)
    undo = []
    if streamer is None:
        undo.append(timer.wrap(dense_pipeline, "compute_unit_scores", "scores"))
    else:
        undo.append(timer.wrap(stream_pipeline, "streaming_unit_scores", "scores"))
    # both pipelines run the one engine through gqa_prune.planning.prune_walk_
    undo.append(timer.wrap(planning, "prune_layerwise_", "compensation"))
    try:
        with timer.step("layer_importance"):
            if args.li_method == "none":
                scores = [1.0] * args.layers
            elif streamer is None:
                scores = compute_layer_importance(
                    model, li_ids, args.li_method, batch, progress=False
                ).scores
            else:
                scores = streaming_layer_importance(
                    streamer, li_ids, args.li_method, batch, progress=False
                ).scores
        with timer.step("prune"):
            outcome = prune_model_(
                model,
                calib,
                allocation_config(defaults),
                layer_importance=scores,
                criterion=defaults.importance,
                batch_size=batch,
                progress=False,
                compensation=defaults.compensation,
                compensation_ids=comp_ids,
                compensation_damp=defaults.compensation_damp,
                streaming=streamer,
            )
    finally:
        for fn in undo:
            fn()
    row = {
        "mode": "in memory" if streamer is None else "streaming",
        "seconds": {k: round(v, 2) for k, v in timer.seconds.items()},
        "total_s": round(timer.seconds["layer_importance"] + timer.seconds["prune"], 2),
        "peak_bytes": peak(device, cpu_start),
        "weight_bytes": weight_bytes,
        "cpu_peak_rss_bytes": cpu_peak_rss(),
        "removed": round(outcome.allocation.achieved_ratio, 4),
        "params_after": outcome.after.total_params,
    }
    row["peak_over_weights"] = round(row["peak_bytes"] / weight_bytes, 3)
    del model, streamer, outcome
    reset_peak(device)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--modes", default="dense,streaming", help="dense, streaming or both")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--q_heads", type=int, default=32)
    p.add_argument("--kv_heads", type=int, default=8)
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--samples", type=int, default=RunConfig().channel_importance_samples)
    p.add_argument("--li_samples", type=int, default=RunConfig().layer_importance_samples)
    p.add_argument("--comp_samples", type=int, default=RunConfig().compensation_samples)
    p.add_argument(
        "--li_method",
        default=RunConfig().layer_importance_method,
        help="removal, activation, block_influence, or none (equal importance)",
    )
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_scale: no CUDA device here; pass --device cpu")
    rows = []
    for mode in args.modes.split(","):
        rows.append(run_mode(mode.strip(), args, device))
        print(json.dumps(rows[-1]), flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(
        f"\nLlama-shaped: {args.layers} layers, hidden {args.hidden}, {args.q_heads} Q / "
        f"{args.kv_heads} KV heads x {args.head_dim}, MLP {args.intermediate}, vocab "
        f"{args.vocab}; bf16 random weights; {args.ratio:.0%} of all parameters; "
        f"{device} ({name}), torch {torch.__version__}\n"
    )
    print(
        "| mode | layer importance s | scores s | compensation s | total s | peak "
        "| peak / bf16 weights |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        s = r["seconds"]
        print(
            f"| {r['mode']} | {s['layer_importance']:.1f} | {s.get('scores', 0):.1f} | "
            f"{s.get('compensation', 0):.1f} | {r['total_s']:.1f} | "
            f"{r['peak_bytes'] / GIB:.2f} GiB | {r['peak_over_weights']:.2f}x |"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
