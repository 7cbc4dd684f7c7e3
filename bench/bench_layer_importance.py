"""Time the layer importance methods on SmolLM2-135M and check fast removal == naive removal.

Usage::

    GQA_PRUNE_DATA_DIR=/work/shared/data python bench/bench_layer_importance.py --samples 4

Prints a markdown table (method, seconds, speed-up vs naive removal) and the five least and
most important layers by removal. Exits with status 1 if fast and naive removal disagree.

``--compare_samples 2,4,8`` instead prints how much the removal scores depend on the number
of calibration sequences (drawn as the CLI draws them, seed ``--seed``): the rank
correlation of each count's scores with the largest count's.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch

from gqa_prune.analysis.layer_importance import (
    LayerImportance,
    compute_layer_importance,
    removal_importance_naive,
)
from gqa_prune.data import load_text, sample_calibration, tokenize_text
from gqa_prune.models.loading import load_model


def _timed(fn: Callable[[], LayerImportance]) -> tuple[LayerImportance, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def _ranks(values: list[float]) -> torch.Tensor:
    return torch.tensor(values).argsort().argsort().double()


def compare_sample_counts(model, tok, tokens, args) -> int:  # noqa: ANN001 - bench helper
    """Removal scores on N x seq_len tokens for each N; rank correlation with the largest N."""
    from gqa_prune.data import bos_prefix

    counts = sorted(int(n) for n in args.compare_samples.split(","))
    scores = {}
    for n in counts:
        ids = sample_calibration(tokens, n, args.seq_len, args.seed, bos_prefix(tok))
        scores[n] = compute_layer_importance(
            model, ids, "removal", batch_size=args.batch_size, progress=False
        ).scores
    ref = _ranks(scores[counts[-1]])
    print(f"\n{args.model}, removal scores, seed {args.seed}, sequences of {args.seq_len}\n")
    print(f"| sequences | rank correlation with {counts[-1]} | least important five |")
    print("|---:|---:|---|")
    for n in counts:
        rho = torch.corrcoef(torch.stack([_ranks(scores[n]), ref]))[0, 1].item()
        least = sorted(range(len(scores[n])), key=lambda i: scores[n][i])[:5]
        print(f"| {n} | {rho:.3f} | {least} |")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=8, help="calibration sequences")
    parser.add_argument("--seq_len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="timings: fastest of N runs")
    parser.add_argument("--data_dir", default=os.environ.get("GQA_PRUNE_DATA_DIR"))
    parser.add_argument("--compare_samples", default=None, help="e.g. 2,4,8 (see above)")
    args = parser.parse_args()

    model, tok = load_model(args.model)
    tokens = tokenize_text(tok, load_text("wikitext2", "calibration", args.data_dir))
    if args.compare_samples:
        return compare_sample_counts(model, tok, tokens, args)
    ids = sample_calibration(tokens, args.samples, args.seq_len, args.seed)
    common = dict(batch_size=args.batch_size, progress=False)

    methods: dict[str, Callable[[], LayerImportance]] = {
        "removal (naive)": lambda: removal_importance_naive(model, ids, **common),
        "removal (suffix)": lambda: compute_layer_importance(model, ids, "removal", **common),
        "activation": lambda: compute_layer_importance(model, ids, "activation", **common),
        "block_influence": lambda: compute_layer_importance(
            model, ids, "block_influence", **common
        ),
    }
    # Repeats are interleaved and the fastest kept: on a shared machine the minimum is the
    # least disturbed measurement.
    runs: dict[str, tuple[LayerImportance, float]] = {}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            result, seconds = _timed(fn)
            runs[name] = (result, min(seconds, runs.get(name, (result, seconds))[1]))
    naive, naive_s = runs["removal (naive)"]
    fast, _ = runs["removal (suffix)"]
    pairs = zip(fast.extra["loss_without_layer"], naive.extra["loss_without_layer"], strict=True)
    diff = max(abs(a - b) for a, b in pairs)
    same = diff <= 1e-4 * max(1.0, abs(fast.extra["base_loss"]))

    print(
        f"\n{args.model}, {torch.get_num_threads()} threads, {fast.num_layers} layers, "
        f"{args.samples} x {args.seq_len} tokens, batch {args.batch_size}, "
        f"dtype {next(model.parameters()).dtype}, fastest of {args.repeats} run(s)\n"
    )
    print("| method | seconds | speed-up vs naive |")
    print("|---|---:|---:|")
    for name, (_, seconds) in runs.items():
        print(f"| {name} | {seconds:.2f} | {naive_s / seconds:.2f}x |")
    print(
        f"\nfast == naive removal: {'yes' if same else 'NO'} "
        f"(max |loss difference| {diff:.2e}); base loss {fast.extra['base_loss']:.4f}, "
        f"ppl {fast.extra['base_ppl']:.2f}\n"
    )
    order = sorted(range(fast.num_layers), key=lambda i: fast.scores[i])
    print("| rank | layer | loss increase | ppl without layer |")
    print("|---|---:|---:|---:|")
    for label, picked in (("least", order[:5]), ("most", order[::-1][:5])):
        for rank, layer in enumerate(picked, 1):
            ppl = fast.extra["ppl_without_layer"][layer]
            print(f"| {label} {rank} | {layer} | {fast.scores[layer]:+.4f} | {ppl:.2f} |")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
