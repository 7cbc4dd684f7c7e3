"""Selection inside each layer: score (Taylor, the default) vs repair (greedy structured OBS).

Both rows prune a fresh copy of the dense model with ``prune_model_`` and the run's defaults
(25% of all parameters, ``--prune_mlp``, inverse alpha 2, split 1:9, Taylor on 32 x 128,
lstsq compensation on 64 x 128, damp 0.1); only ``selection`` differs. Layer importance
(removal, 8 x 128) is computed once and shared. Validation only, never the test split:
the calibration text (wikitext-2 valid) is cut as ``gqa-prune search`` does (its last
``--validation_fraction`` held out for perplexity, calibration windows drawn from the rest),
and the zero-shot column uses the validation files of ARC-Easy, ARC-Challenge and OpenBookQA.
"prune s" is the ``prune_model_`` call (unit scores + allocation + selection + compensation);
CPU seconds are noisy on a shared machine, so the ratio to the score row (same process)
is printed too.

    GQA_PRUNE_DATA_DIR=/work/shared/data python bench/bench_selection.py \\
        --eval_windows 40 --zeroshot_limit 50
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
from zeroshot_column import ZeroShotColumn, add_zeroshot_arguments

from gqa_prune.analysis import compute_layer_importance
from gqa_prune.config import RunConfig
from gqa_prune.data import load_text, sample_calibration, tokenize_text
from gqa_prune.evaluation.perplexity import evaluate_perplexity
from gqa_prune.models.adapters import get_adapter
from gqa_prune.models.loading import load_model
from gqa_prune.pipeline import prune_model_
from gqa_prune.runner import allocation_config
from gqa_prune.search import split_validation


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratio", type=float, default=0.25, help="fraction of TOTAL parameters")
    p.add_argument("--selections", default="score,repair")
    p.add_argument("--validation_fraction", type=float, default=0.1)
    p.add_argument("--eval_windows", type=int, default=40, help="validation windows of 128")
    p.add_argument("--no_dense", action="store_true", help="skip the dense row")
    p.add_argument("--data_dir", default=os.environ.get("GQA_PRUNE_DATA_DIR"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    add_zeroshot_arguments(p, default_limit=0)
    args = p.parse_args()
    if args.zeroshot_split != "validation":
        p.error("this benchmark chooses a default: use --zeroshot_split validation")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    c = RunConfig(pruning_ratio=args.ratio, prune_mlp=True)

    dense, tok = load_model(args.model, device="cpu")
    geometry = get_adapter(dense).geometry(dense)
    tokens = tokenize_text(tok, load_text(c.calibration_dataset, "calibration", args.data_dir))
    calib, valid = split_validation(tokens, args.validation_fraction)
    seq = c.taylor_seq_len
    ids = sample_calibration(calib, c.channel_importance_samples, seq, args.seed)
    li_ids = sample_calibration(calib, c.layer_importance_samples, seq, args.seed + 1)
    comp_ids = sample_calibration(calib, c.compensation_samples, seq, args.seed + 2)
    column = ZeroShotColumn.from_args(args)

    def evaluate(model: torch.nn.Module) -> tuple[float, str]:
        ppl = evaluate_perplexity(model, valid, seq, args.eval_windows, progress=False).ppl
        zs = column.cell(model, tok) if column is not None else "-"
        return ppl, zs

    t0 = time.perf_counter()
    importance = compute_layer_importance(
        dense, li_ids, c.layer_importance_method, progress=False
    ).scores
    li_seconds = time.perf_counter() - t0
    rows = []
    if not args.no_dense:
        rows.append(("dense", *evaluate(dense), float("nan"), geometry.total_params))
    for selection in args.selections.split(","):
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        outcome = prune_model_(
            model,
            ids,
            allocation_config(c),
            layer_importance=importance,
            criterion=c.importance,
            aggregation=c.aggregation,
            batch_size=c.taylor_batch_size,
            seed=args.seed,
            progress=False,
            compensation=c.compensation,
            compensation_ids=comp_ids,
            compensation_damp=c.compensation_damp,
            selection=selection,
        )
        seconds = time.perf_counter() - t0
        rows.append(
            (f"selection {selection}", *evaluate(model), seconds, outcome.after.total_params)
        )
        model.zero_grad(set_to_none=True)
        del model

    n_windows = min(args.eval_windows, valid.numel() // seq)
    zs_header = column.header if column is not None else "zero-shot (off)"
    print(
        f"\n{args.model}, {100 * args.ratio:.0f}% of {geometry.total_params:,} parameters "
        f"(defaults: {c.pruning_strategy} alpha {c.alpha:g}, split {c.pruning_distribution}, "
        f"{c.importance} on {c.channel_importance_samples} x {seq}, {c.compensation} on "
        f"{c.compensation_samples} x {seq}, damp {c.compensation_damp:g}); validation "
        f"perplexity on the first {n_windows} windows of {seq} of the last "
        f"{args.validation_fraction:.0%} of {c.calibration_dataset} valid; layer importance "
        f"({c.layer_importance_method}) once, {li_seconds:.1f} s; "
        f"{torch.get_num_threads()} threads\n"
    )
    base = next((r[3] for r in rows if r[0] == "selection score"), float("nan"))
    print(f"| selection | val perplexity | {zs_header} | prune s | vs score | parameters |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, ppl, zs, seconds, params in rows:
        ratio = "" if seconds != seconds else f"{seconds / base:.2f}x"
        secs = "" if seconds != seconds else f"{seconds:.1f}"
        print(f"| {name} | {ppl:.2f} | {zs} | {secs} | {ratio} | {params:,} |")


if __name__ == "__main__":
    main()
