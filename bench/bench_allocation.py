"""Allocation strategies and unit criteria on SmolLM2-135M at a fixed total pruning ratio.

Same calibration tokens and the same evaluation windows for every row. Unit scores are
computed once per criterion; every variant prunes a fresh copy of the dense model.

    GQA_PRUNE_DATA_DIR=../shared/data python bench/bench_allocation.py \
        --samples 16 --eval_windows 40
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch

from gqa_prune.allocation import AllocationConfig, allocate, allocate_global
from gqa_prune.analysis import compute_layer_importance
from gqa_prune.data import load_text, sample_calibration, tokenize_text
from gqa_prune.evaluation.perplexity import evaluate_perplexity
from gqa_prune.importance import compute_unit_scores
from gqa_prune.models.adapters import get_adapter
from gqa_prune.models.loading import load_model
from gqa_prune.pipeline import build_plan
from gqa_prune.slicing import apply_plan_


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--samples", type=int, default=16, help="Taylor/wanda calibration sequences")
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--li_samples", type=int, default=4, help="layer-importance sequences")
    p.add_argument("--eval_windows", type=int, default=40)
    p.add_argument("--data_dir", default=os.environ.get("GQA_PRUNE_DATA_DIR"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--focus",
        choices=["all", "split", "attention_removal"],
        default="all",
        help="split: only the attention:MLP split x layer importance x alpha rows; "
        "attention_removal: the same allocations with and without whole-block removal",
    )
    args = p.parse_args()
    torch.manual_seed(args.seed)

    dense, tok = load_model(args.model, device="cpu")
    geometry = get_adapter(dense).geometry(dense)
    calib_tokens = tokenize_text(tok, load_text("wikitext2", "calibration", args.data_dir))
    eval_tokens = tokenize_text(tok, load_text("wikitext2", "eval", args.data_dir))
    calib = sample_calibration(calib_tokens, args.samples, args.seq_len, args.seed)
    li_ids = sample_calibration(calib_tokens, args.li_samples, args.seq_len, args.seed + 1)

    def ppl(model) -> float:
        return evaluate_perplexity(
            model, eval_tokens, args.seq_len, args.eval_windows, progress=False
        ).ppl

    # ---- layer importance: time of each method
    li_rows, li = [], {}
    for method in ("removal", "activation", "block_influence"):
        t0 = time.perf_counter()
        li[method] = compute_layer_importance(dense, li_ids, method, progress=False).scores
        li_rows.append((method, time.perf_counter() - t0))

    dense_ppl = ppl(dense)
    scores, score_time = {}, {}
    for crit in ("taylor", "taylor2", "magnitude", "wanda", "random")[
        : 5 if args.focus == "all" else 1
    ]:
        t0 = time.perf_counter()
        scores[crit] = compute_unit_scores(
            dense, calib, crit, batch_size=4, seed=args.seed, progress=False
        )
        score_time[crit] = time.perf_counter() - t0

    def variant(crit: str, importance, mode: str = "layer", **cfg) -> tuple[float, float]:
        config = AllocationConfig(pruning_ratio=args.ratio, **cfg)
        s = scores[crit]
        if mode == "global":
            alloc = allocate_global(s.groups, s.channels, geometry, config, importance=importance)
        else:
            alloc = allocate(importance, geometry, config)
        model = copy.deepcopy(dense)
        after = apply_plan_(model, build_plan(s, alloc, geometry))
        if after.kv_heads.count(0):
            print(f"  {after.kv_heads.count(0)} attention blocks removed: {after.kv_heads}")
        return ppl(model), alloc.achieved_ratio

    rows = []
    split_variants = [
        (
            f"inverse a={a}, 1:9, {m} importance",
            "taylor",
            li[m],
            "layer",
            {"distribution": (1, 9), "alpha": a},
        )
        for m in ("removal", "block_influence")
        for a in (0.5, 1.0, 2.0)
    ] + [
        ("global, 1:9", "taylor", li["removal"], "global", {"distribution": (1, 9)}),
        ("global, 0:10 (MLP only)", "taylor", li["removal"], "global", {"prune_attention": False}),
    ]
    all_variants = [
        ("uniform", "taylor", li["removal"], "layer", {"strategy": "uniform"}),
        ("inverse (removal importance)", "taylor", li["removal"], "layer", {}),
        ("inverse (block_influence importance)", "taylor", li["block_influence"], "layer", {}),
        ("inverse (activation importance)", "taylor", li["activation"], "layer", {}),
        (
            "proportional (removal importance)",
            "taylor",
            li["removal"],
            "layer",
            {"strategy": "proportional"},
        ),
        ("global (score per parameter)", "taylor", li["removal"], "global", {}),
        (
            "inverse, distribution 0:10 (MLP only)",
            "taylor",
            li["removal"],
            "layer",
            {"prune_attention": False},
        ),
        ("inverse, distribution 1:9", "taylor", li["removal"], "layer", {"distribution": (1, 9)}),
        ("inverse, distribution 3:7", "taylor", li["removal"], "layer", {"distribution": (3, 7)}),
        (
            "uniform, distribution 0:10 (MLP only)",
            "taylor",
            li["removal"],
            "layer",
            {"strategy": "uniform", "prune_attention": False},
        ),
    ]
    removal_variants = [
        (
            f"{label}{', blocks removable' if allow else ''}",
            "taylor",
            li["removal"],
            mode,
            {**cfg, "allow_attention_removal": allow},
        )
        for label, mode, cfg in (
            ("inverse a=2, 1:9", "layer", {"distribution": (1, 9), "alpha": 2.0}),
            ("inverse a=2, 3:7", "layer", {"distribution": (3, 7), "alpha": 2.0}),
            ("inverse a=4, 5:5", "layer", {"distribution": (5, 5), "alpha": 4.0}),
            ("global, 1:9", "global", {"distribution": (1, 9)}),
        )
        for allow in (False, True)
    ]
    chosen = {"split": split_variants, "attention_removal": removal_variants}
    for name, crit, imp, mode, cfg in chosen.get(args.focus, all_variants):
        t0 = time.perf_counter()
        value, achieved = variant(crit, imp, mode, **cfg)
        rows.append((name, crit, value, achieved, time.perf_counter() - t0))
    for crit in ("taylor2", "magnitude", "wanda", "random") if args.focus == "all" else ():
        value, achieved = variant(crit, li["removal"])
        rows.append(("inverse (removal importance)", crit, value, achieved, score_time[crit]))

    n_tok = min(args.eval_windows, eval_tokens.numel() // args.seq_len) * (args.seq_len - 1)
    print(
        f"\n{args.model}, {100 * args.ratio:.0f}% of {geometry.total_params:,} parameters, "
        f"{args.samples} x {args.seq_len} calibration tokens (wikitext-2 valid), "
        f"perplexity on the first {args.eval_windows} windows of {args.seq_len} "
        f"(~{n_tok:,} tokens) of wikitext-2 raw test, {torch.get_num_threads()} threads\n"
    )
    print(f"dense perplexity: {dense_ppl:.2f}\n")
    print("| allocation | unit criterion | perplexity | removed (total) |")
    print("|---|---|---:|---:|")
    for name, crit, value, achieved, _ in rows:
        print(f"| {name} | {crit} | {value:.2f} | {100 * achieved:.2f}% |")
    print("\n| layer-importance method | seconds |\n|---|---:|")
    for method, sec in li_rows:
        print(f"| {method} ({args.li_samples} x {args.seq_len} tokens) | {sec:.1f} |")
    print("\n| unit criterion | scoring seconds |\n|---|---:|")
    for crit, sec in score_time.items():
        print(f"| {crit} | {sec:.1f} |")


if __name__ == "__main__":
    main()
