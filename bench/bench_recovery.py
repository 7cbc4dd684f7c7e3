"""Recovery on SmolLM2-135M pruned 25%: perplexity before / after LoRA, full, distillation.

The dense model is pruned ONCE (removal layer importance, Taylor unit scores, the runner's
default allocation, read from ``RunConfig()``); every method then trains a deep copy
of that pruned model on the same packed sequences (wikitext-2 valid, seeded: the same token
budget and the same batches for every method; distillation's teacher is the dense model).
Perplexity is measured on the first --eval_windows windows of --seq_len tokens of
wikitext-2 raw test. "train s" is the Trainer's wall time, "ppl s" the evaluation's.

    GQA_PRUNE_DATA_DIR=/work/shared/data python bench/bench_recovery.py \\
        --tokens 8192 --eval_windows 40 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import time

import torch

from gqa_prune.allocation import AllocationConfig
from gqa_prune.analysis import compute_layer_importance
from gqa_prune.config import RunConfig
from gqa_prune.data import load_text, sample_calibration, tokenize_text
from gqa_prune.evaluation.perplexity import evaluate_perplexity
from gqa_prune.models.adapters import get_adapter
from gqa_prune.models.loading import load_model
from gqa_prune.pipeline import prune_model_
from gqa_prune.recovery import FinetuneConfig, finetune_


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratio", type=float, default=0.25, help="fraction of TOTAL parameters")
    p.add_argument("--samples", type=int, default=16, help="Taylor calibration sequences")
    p.add_argument("--li_samples", type=int, default=4, help="layer-importance sequences")
    p.add_argument("--seq_len", type=int, default=128, help="training and evaluation length")
    p.add_argument("--tokens", type=int, default=8192, help="training tokens per method")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--methods", default="lora,full,distill", help="comma-separated; '' = none")
    p.add_argument(
        "--dense_baseline",
        action="store_true",
        help="also fine-tune the DENSE model (full, --lr_full, same tokens): how much of the "
        "gain is adaptation to the text rather than recovery from pruning",
    )
    p.add_argument("--lr_lora", type=float, default=5e-4)
    p.add_argument("--lr_full", type=float, default=5e-5)
    p.add_argument("--lr_distill", type=float, default=5e-5)
    p.add_argument("--distill_top_k", type=int, default=None)
    p.add_argument("--eval_windows", type=int, default=40)
    p.add_argument("--data_dir", default=os.environ.get("GQA_PRUNE_DATA_DIR"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)

    dense, tok = load_model(args.model, device="cpu")
    geometry = get_adapter(dense).geometry(dense)
    calib_tokens = tokenize_text(tok, load_text("wikitext2", "calibration", args.data_dir))
    eval_tokens = tokenize_text(tok, load_text("wikitext2", "eval", args.data_dir))

    def ppl(model) -> tuple[float, float]:
        t0 = time.perf_counter()
        value = evaluate_perplexity(
            model, eval_tokens, args.seq_len, args.eval_windows, progress=False
        ).ppl
        return value, time.perf_counter() - t0

    dense_ppl, dense_s = ppl(dense)
    pruned = copy.deepcopy(dense)
    li_ids = sample_calibration(calib_tokens, args.li_samples, args.seq_len, args.seed + 1)
    importance = compute_layer_importance(dense, li_ids, "removal", progress=False).scores
    calib = sample_calibration(calib_tokens, args.samples, args.seq_len, args.seed)
    t0 = time.perf_counter()
    run_defaults = RunConfig()  # the CLI's allocation defaults at the time of the run
    allocation = AllocationConfig(
        pruning_ratio=args.ratio,
        strategy=run_defaults.pruning_strategy,  # type: ignore[arg-type]
        alpha=run_defaults.alpha,
        distribution=run_defaults.distribution,
    )
    outcome = prune_model_(
        pruned,
        calib,
        allocation,
        layer_importance=importance,
        batch_size=4,
        progress=False,
    )
    prune_s = time.perf_counter() - t0
    pruned.zero_grad(set_to_none=True)
    pruned_ppl, pruned_s = ppl(pruned)

    rows = [
        ("dense", "", 0, 0, None, dense_ppl, dense_s, None),
        ("pruned, no recovery", "", 0, 0, None, pruned_ppl, pruned_s, None),
    ]
    lrs = {"lora": args.lr_lora, "full": args.lr_full, "distill": args.lr_distill}
    runs = [(m, pruned, m) for m in args.methods.split(",") if m]
    if args.dense_baseline:
        runs.append(("dense + full", dense, "full"))
    for name, start, method in runs:
        model = copy.deepcopy(start)
        config = FinetuneConfig(
            method=method,  # type: ignore[arg-type]
            lr=lrs[method],
            seq_len=args.seq_len,
            num_samples=args.tokens // args.seq_len,
            max_tokens=args.tokens,
            batch_size=args.batch_size,
            warmup_steps=args.warmup,
            distill_top_k=args.distill_top_k,
            seed=args.seed,
        )
        teacher = dense if method == "distill" else None
        result = finetune_(model, tok, config, teacher=teacher, tokens=calib_tokens)
        value, seconds = ppl(model)
        rows.append(
            (
                name,
                f"{lrs[method]:g}",
                result.steps,
                result.tokens,
                result.wall_time_s,
                value,
                seconds,
                result.final_loss,
            )
        )
        del model

    removed = 1 - outcome.after.total_params / geometry.total_params
    n_tok = min(args.eval_windows, eval_tokens.numel() // args.seq_len) * (args.seq_len - 1)
    print(
        f"\n{args.model}: {100 * removed:.2f}% of {geometry.total_params:,} parameters removed "
        f"(target {100 * args.ratio:.0f}%; the CLI defaults: {allocation.strategy}, alpha "
        f"{allocation.alpha:g}, attention:MLP {run_defaults.pruning_distribution}, removal "
        f"importance on "
        f"{args.li_samples} x {args.seq_len}, Taylor on {args.samples} x {args.seq_len} tokens, "
        f"{prune_s:.0f} s). "
        f"Recovery: {args.tokens:,} tokens per method (wikitext-2 valid, packed "
        f"{args.seq_len}-token sequences, batch {args.batch_size}, warm-up {args.warmup} + "
        f"cosine, clip 1.0, fp32, seed {args.seed}; LoRA r 8 / alpha 16 on all projections; "
        f"distill alpha 0.5, T 2, top-k {args.distill_top_k or 'all'}). Perplexity on the first "
        f"{args.eval_windows} windows of {args.seq_len} (~{n_tok:,} tokens) of wikitext-2 raw "
        f"test; {torch.get_num_threads()} torch threads\n"
    )
    print("| model | lr | steps | tokens | train s | perplexity | ppl s | final train loss |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, lr, steps, tokens, train_s, value, ppl_s, loss in rows:
        loss_text = "" if loss is None else f"{loss:.3f}"
        train_text = "" if train_s is None else f"{train_s:.0f}"
        print(
            f"| {name} | {lr} | {steps} | {tokens:,} | {train_text} | {value:.2f} "
            f"| {ppl_s:.0f} | {loss_text} |"
        )


if __name__ == "__main__":
    main()
