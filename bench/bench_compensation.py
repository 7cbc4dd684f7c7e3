"""Compensation on SmolLM2-135M: plain deletion vs least-squares refit vs FLAP bias.

Same calibration tokens (wikitext-2 valid; Taylor seed = --seed, layer importance seed + 1,
compensation seed + 2, as in the runner) and the same evaluation windows for every row.
Unit scores and the allocation are computed ONCE; every variant prunes a deep copy of the
dense model to the same plan, so the rows differ only in how the remaining weights are
repaired. Seconds and peak RSS (whole process: dense model and the copy included) are those
of the slicing/compensation step; "compensation buffers" is what it holds besides the model.

    GQA_PRUNE_DATA_DIR=/work/shared/data python bench/bench_compensation.py \\
        --samples 16 --compensation_samples 64 --eval_windows 40
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from collections.abc import Callable

import torch

from gqa_prune.allocation import AllocationConfig, allocate, allocate_global
from gqa_prune.analysis import compute_layer_importance
from gqa_prune.compensation import apply_plan_sequential_
from gqa_prune.config import STRATEGIES, RunConfig, parse_distribution
from gqa_prune.data import load_text, sample_calibration, tokenize_text
from gqa_prune.evaluation.perplexity import evaluate_perplexity
from gqa_prune.importance import compute_unit_scores
from gqa_prune.models.adapters import get_adapter
from gqa_prune.models.loading import load_model
from gqa_prune.pipeline import build_plan
from gqa_prune.slicing import apply_plan_


def _rss_mib(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process, MiB (Linux /proc)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def measured(step: Callable[[], object]) -> tuple[float, float]:
    """Seconds and peak RSS (MiB, whole process, model copies included) of ``step``."""
    resettable = _reset_peak_rss()
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    return seconds, _rss_mib("VmHWM") if resettable else float("nan")


def buffers_mib(model: torch.nn.Module, ids: torch.Tensor, compensation: str) -> float:
    """What compensation holds besides the model: the boundary hidden states of the
    calibration set (N x L x hidden, model dtype) and the largest Gram matrix (fp32; lstsq)."""
    geometry = get_adapter(model).geometry(model)
    itemsize = next(model.parameters()).element_size()
    states = ids.numel() * geometry.hidden_size * itemsize
    n_o = max(geometry.q_heads) * geometry.head_dim
    gram = 4 * max(n_o, *geometry.intermediate_sizes) ** 2 if compensation == "lstsq" else 0
    return (states + gram) / 2**20 if compensation != "none" else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratio", type=float, default=0.25, help="fraction of TOTAL parameters")
    p.add_argument("--samples", type=int, default=16, help="Taylor calibration sequences")
    p.add_argument("--li_samples", type=int, default=4, help="layer-importance sequences")
    p.add_argument("--compensation_samples", type=int, default=64)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--eval_windows", type=int, default=40)
    d = RunConfig()  # the allocation defaults, chosen by bench/bench_allocation.py
    p.add_argument("--strategy", default=d.pruning_strategy, choices=list(STRATEGIES))
    p.add_argument("--alpha", type=float, default=d.alpha, help="importance weighting strength")
    p.add_argument(
        "--distribution",
        default=d.pruning_distribution,
        help="attention:MLP share of the removed parameters, e.g. 1:9",
    )
    p.add_argument("--mode", default="layer", choices=["layer", "global"])
    p.add_argument("--damps", default="1e-3,1e-2,1e-1", help="lstsq damp values, comma-separated")
    p.add_argument("--no_bias", action="store_true", help="skip the bias row")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--data_dir", default=os.environ.get("GQA_PRUNE_DATA_DIR"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)

    dense, tok = load_model(args.model, device="cpu")
    geometry = get_adapter(dense).geometry(dense)
    calib_tokens = tokenize_text(tok, load_text("wikitext2", "calibration", args.data_dir))
    eval_tokens = tokenize_text(tok, load_text("wikitext2", "eval", args.data_dir))
    calib = sample_calibration(calib_tokens, args.samples, args.seq_len, args.seed)
    comp_ids = sample_calibration(
        calib_tokens, args.compensation_samples, args.seq_len, args.seed + 2
    )

    def ppl(model) -> float:
        return evaluate_perplexity(
            model, eval_tokens, args.seq_len, args.eval_windows, progress=False
        ).ppl

    config = AllocationConfig(
        pruning_ratio=args.ratio,
        strategy=args.strategy,  # type: ignore[arg-type]
        alpha=args.alpha,
        distribution=parse_distribution(args.distribution),
    )
    importance = [1.0] * geometry.num_layers
    if args.strategy != "uniform" or args.mode == "global":
        li_ids = sample_calibration(calib_tokens, args.li_samples, args.seq_len, args.seed + 1)
        importance = list(compute_layer_importance(dense, li_ids, "removal", progress=False).scores)
    scores = compute_unit_scores(dense, calib, "taylor", batch_size=4, progress=False)
    if args.mode == "global":
        alloc = allocate_global(
            scores.groups, scores.channels, geometry, config, importance=importance
        )
    else:
        alloc = allocate(importance, geometry, config)
    plan = build_plan(scores, alloc, geometry)
    dense.zero_grad(set_to_none=True)
    dense_ppl = ppl(dense)

    variants: dict[str, Callable[[torch.nn.Module], object]] = {
        "none (plain deletion)": lambda m: apply_plan_(m, plan),
    }
    if not args.no_bias:
        variants["bias (FLAP)"] = lambda m: apply_plan_sequential_(
            m, plan, comp_ids, "bias", batch_size=args.batch_size
        )
    for damp in (float(d) for d in args.damps.split(",") if d):
        variants[f"lstsq, damp {damp:g}"] = lambda m, d=damp: apply_plan_sequential_(
            m, plan, comp_ids, "lstsq", damp=d, batch_size=args.batch_size
        )
    rows = []
    for name, step in variants.items():
        model = copy.deepcopy(dense)
        seconds, peak = measured(lambda step=step, model=model: step(model))
        params = get_adapter(model).geometry(model).total_params
        kind = name.split()[0].rstrip(",")
        held = buffers_mib(dense, comp_ids, kind)
        rows.append((name, ppl(model), seconds, peak, held, 1 - params / geometry.total_params))
        del model

    none_ppl = rows[0][1]
    n_tok = min(args.eval_windows, eval_tokens.numel() // args.seq_len) * (args.seq_len - 1)
    alloc_name = f"{args.mode} mode, {args.strategy}, alpha {args.alpha:g}" + (
        f", distribution {args.distribution}" if args.distribution else ""
    )
    print(
        f"\n{args.model}, {100 * args.ratio:.0f}% of {geometry.total_params:,} parameters "
        f"({alloc_name}, removal layer importance on {args.li_samples} x {args.seq_len}, "
        f"Taylor on {args.samples} x {args.seq_len} tokens); compensation on "
        f"{args.compensation_samples} x {args.seq_len} tokens (wikitext-2 valid); perplexity on "
        f"the first {args.eval_windows} windows of {args.seq_len} (~{n_tok:,} tokens) of "
        f"wikitext-2 raw test; {torch.get_num_threads()} threads\n"
    )
    print(f"dense perplexity: {dense_ppl:.2f}\n")
    print(
        "| compensation | perplexity | ppl(none) / ppl | seconds | peak RSS (MiB) "
        "| compensation buffers (MiB) | removed (total) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, value, seconds, peak, held, removed in rows:
        print(
            f"| {name} | {value:.2f} | {none_ppl / value:.2f}x | {seconds:.1f} | {peak:.0f} "
            f"| {held:.0f} | {100 * removed:.2f}% |"
        )


if __name__ == "__main__":
    main()
