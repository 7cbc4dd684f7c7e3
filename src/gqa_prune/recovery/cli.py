"""Recovery flags (shared with ``gqa-prune``) and the standalone ``gqa-prune-finetune`` command.

``gqa-prune --finetune ...`` prunes and recovers in one process. To recover a saved pruned
model on several GPUs, run the standalone command under accelerate (the Trainer does DDP,
or FSDP / DeepSpeed from ``accelerate config``)::

    accelerate launch --num_processes 4 -m gqa_prune.recovery \\
        --model prune_log/NAME/model --teacher BASE_MODEL --finetune_method distill

Only the main process writes (``model_finetuned/``, ``finetune_loss.png``,
``finetune.json`` beside the pruned model) and evaluates.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gqa_prune.cli_utils import (
    UserErrorParser,
    add_data_dir_argument,
    add_dtype_seed_arguments,
    add_perplexity_arguments,
    int_or_none,
)
from gqa_prune.errors import GQAPruneError
from gqa_prune.recovery.config import (
    FINETUNE_DEFAULTS,
    FINETUNE_METHODS,
    LORA_TARGETS,
    SCHEDULERS,
    FinetuneConfig,
)


def _float_or_none(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def add_finetune_arguments(parser: argparse.ArgumentParser, with_switch: bool = True) -> None:
    """Add the ``--finetune_*`` / ``--lora_*`` / ``--distill_*`` flags (FinetuneConfig defaults)."""
    d = FINETUNE_DEFAULTS
    g = parser.add_argument_group("6. recovery fine-tuning (after pruning)")
    if with_switch:
        g.add_argument(
            "--finetune",
            action="store_true",
            help="fine-tune the pruned model; writes model_finetuned/ and finetune_loss.png",
        )
    g.add_argument(
        "--finetune_method",
        default=d.method,
        choices=FINETUNE_METHODS,
        help="lora: peft adapters merged into the weights; full: every parameter; "
        "distill: every parameter, KL to the unpruned model + CE",
    )
    g.add_argument(
        "--finetune_lr",
        type=_float_or_none,
        default=d.lr,
        help="peak learning rate; None = 1e-4 for lora, 2e-5 for full/distill",
    )
    g.add_argument(
        "--finetune_epochs", type=float, default=d.epochs, help="passes over the sequences"
    )
    g.add_argument(
        "--finetune_samples",
        type=int,
        default=d.num_samples,
        help="packed training sequences of --finetune_seq_len tokens",
    )
    g.add_argument(
        "--finetune_max_tokens",
        type=int_or_none,
        default=d.max_tokens,
        help="token budget: at most this many training tokens per epoch",
    )
    g.add_argument(
        "--finetune_batch_size",
        type=int,
        default=d.batch_size,
        help="sequences per device per micro-batch",
    )
    g.add_argument(
        "--finetune_seq_len", type=int, default=d.seq_len, help="tokens per packed sequence"
    )
    g.add_argument(
        "--finetune_grad_accum",
        type=int,
        default=d.grad_accum,
        help="micro-batches per optimizer step",
    )
    g.add_argument(
        "--finetune_max_grad_norm",
        type=float,
        default=d.max_grad_norm,
        help="gradient clipping (0 = off)",
    )
    g.add_argument(
        "--finetune_weight_decay", type=float, default=d.weight_decay, help="AdamW weight decay"
    )
    g.add_argument(
        "--finetune_warmup_steps", type=int, default=d.warmup_steps, help="linear warm-up steps"
    )
    g.add_argument(
        "--finetune_scheduler",
        default=d.scheduler,
        choices=SCHEDULERS,
        help="learning-rate schedule after the linear warm-up",
    )
    g.add_argument(
        "--finetune_dataset",
        default=None,
        help="non-test text source; None = --calibration_dataset",
    )
    g.add_argument(
        "--finetune_snapshot_every",
        type=int,
        default=d.snapshot_every,
        help="copy the trainable weights to CPU every N steps; restored on NaN/inf",
    )
    g.add_argument("--lora_r", type=int, default=d.lora_r, help="LoRA rank")
    g.add_argument(
        "--lora_alpha",
        type=int,
        default=d.lora_alpha,
        help="LoRA scale numerator: the update is (lora_alpha / lora_r) * B @ A",
    )
    g.add_argument(
        "--lora_dropout", type=float, default=d.lora_dropout, help="dropout on the LoRA input"
    )
    g.add_argument(
        "--lora_targets",
        default=d.lora_targets,
        choices=LORA_TARGETS,
        help="projections that get adapters: attention (q/k/v/o), mlp, or all",
    )
    g.add_argument(
        "--distill_alpha",
        type=float,
        default=d.distill_alpha,
        help="weight of the KL term (1 - weight of the cross-entropy)",
    )
    g.add_argument(
        "--distill_temperature",
        type=float,
        default=d.distill_temperature,
        help="softmax temperature T of the KL term (scaled by T^2)",
    )
    g.add_argument(
        "--distill_top_k",
        type=int_or_none,
        default=d.distill_top_k,
        help="keep the teacher's top-k logits per token (none = whole vocabulary)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = UserErrorParser(
        prog="gqa-prune-finetune",
        description="Recover a saved pruned model (LoRA / full / distillation); runs under "
        "accelerate launch for several GPUs.",
    )
    p.add_argument("--model", required=True, help="pruned checkpoint folder (prune_log/NAME/model)")
    p.add_argument(
        "--teacher",
        default=None,
        help="unpruned model for --finetune_method distill (folder, hub id, built-in name)",
    )
    p.add_argument(
        "--output", default=None, help="output folder (default: model_finetuned/ beside --model)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_data_dir_argument(p)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add_dtype_seed_arguments(p, "auto", FINETUNE_DEFAULTS.seed)
    p.add_argument("--test_after_finetune", action="store_true", help="perplexity after recovery")
    p.add_argument("--eval_dataset", default="wikitext2", help="name or text file (test split)")
    add_perplexity_arguments(p, seq_len=128, max_windows=None)
    add_finetune_arguments(p, with_switch=False)
    return p


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    return FinetuneConfig(
        method=args.finetune_method,
        lr=args.finetune_lr,
        epochs=args.finetune_epochs,
        num_samples=args.finetune_samples,
        batch_size=args.finetune_batch_size,
        seq_len=args.finetune_seq_len,
        grad_accum=args.finetune_grad_accum,
        max_grad_norm=args.finetune_max_grad_norm,
        weight_decay=args.finetune_weight_decay,
        warmup_steps=args.finetune_warmup_steps,
        scheduler=args.finetune_scheduler,
        max_tokens=args.finetune_max_tokens,
        dataset=args.finetune_dataset or "wikitext2",
        data_dir=args.data_dir,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        lora_targets=args.lora_targets,
        distill_alpha=args.distill_alpha,
        distill_temperature=args.distill_temperature,
        distill_top_k=args.distill_top_k,
        snapshot_every=args.finetune_snapshot_every,
        seed=args.seed,
    )


def run_finetune(args: argparse.Namespace) -> dict[str, Any]:
    """Load, recover, and (main process) save and evaluate; returns the finetune.json content."""
    import torch
    from accelerate import PartialState  # type: ignore[import-untyped]

    from gqa_prune.data import bos_prefix, load_text, tokenize_text
    from gqa_prune.evaluation.perplexity import evaluate_perplexity
    from gqa_prune.io_utils import write_json_atomic
    from gqa_prune.models.checkpoint import load_pruned, save_pruned
    from gqa_prune.models.device import resolve_device
    from gqa_prune.models.loading import load_model
    from gqa_prune.recovery.plots import plot_finetune_loss
    from gqa_prune.recovery.trainer import finetune_
    from gqa_prune.reporting.experiment import setup_logging

    config = config_from_args(args)
    model_dir = Path(args.model)
    output = Path(args.output) if args.output else model_dir.parent / "model_finetuned"
    if output.exists() and not args.overwrite:
        raise GQAPruneError(f"{output} already exists; pass --overwrite or choose --output")
    if config.method == "distill" and not args.teacher:
        raise GQAPruneError("--finetune_method distill needs --teacher (the unpruned model)")
    device = resolve_device(args.device)
    state = PartialState(cpu=device.type == "cpu")  # cpu: several processes talk over gloo
    setup_logging(None, verbose=state.is_main_process)
    if device.type == "cuda" and state.num_processes > 1:  # one GPU per process
        device = torch.device("cuda", state.local_process_index)
    model, tokenizer = load_pruned(model_dir, dtype=args.dtype, device=str(device))
    if tokenizer is None:
        raise GQAPruneError(f"{model_dir} holds no tokenizer; save the pruned model with one")
    teacher = None
    if args.teacher:
        teacher, _ = load_model(args.teacher, dtype=args.dtype, device=str(device))
    result = finetune_(model, tokenizer, config, teacher=teacher)
    record: dict[str, Any] = {"model": str(model_dir), "output": str(output), **result.to_dict()}
    if state.is_main_process:
        save_pruned(model, tokenizer, output, overwrite=args.overwrite)
        plot_finetune_loss(output.parent / "finetune_loss.png", result)
        if args.test_after_finetune:
            tokens = tokenize_text(tokenizer, load_text(args.eval_dataset, "eval", args.data_dir))
            ppl = evaluate_perplexity(
                model,
                tokens,
                args.eval_seq_len,
                args.eval_max_windows,
                dataset=args.eval_dataset,
                bos_token_id=bos_prefix(tokenizer),
            )
            record["perplexity_after_finetune"] = ppl.to_dict()
        record["loss_history"] = result.loss_history
        write_json_atomic(output.parent / "finetune.json", record)
    state.wait_for_everyone()
    return record


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        record = run_finetune(args)
    except GQAPruneError as exc:
        print(f"gqa-prune-finetune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gqa-prune-finetune: interrupted", file=sys.stderr)
        return 130
    from accelerate import PartialState  # type: ignore[import-untyped]

    if PartialState().is_main_process:
        record.pop("loss_history", None)
        print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
