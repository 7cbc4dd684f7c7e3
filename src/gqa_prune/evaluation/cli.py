"""Sub-command ``gqa-prune bench-speed``: parse -> measure dense and pruned -> print.

Registered in ``gqa_prune.cli.SUBCOMMANDS``; user errors raise ``GQAPruneError``, which
``gqa_prune.cli.main`` prints as one line (exit status 2).
"""

from __future__ import annotations

import argparse
import gc
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from gqa_prune.cli_utils import UserErrorParser, add_model_arguments
from gqa_prune.errors import GQAPruneError
from gqa_prune.models.loading import DEFAULT_MODEL


def build_speed_parser() -> argparse.ArgumentParser:
    p = UserErrorParser(
        prog="gqa-prune bench-speed",
        description="Parameters, size, prefill / decode tokens per second and peak memory of "
        "the dense and the pruned model, one after the other on the same device.",
    )
    add_model_arguments(p, DEFAULT_MODEL, device="auto", dtype="auto", seed=42)
    p.add_argument(
        "--pruned", required=True, help="pruned checkpoint folder (prune_log/NAME/model)"
    )
    p.add_argument("--prompt_len", type=int, default=128, help="prompt tokens per sequence")
    p.add_argument("--new_tokens", type=int, default=32, help="greedy decode steps")
    p.add_argument("--batch_size", type=int, default=1, help="sequences per run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    p.add_argument("--output", default=None, help="also write the figures to this JSON file")
    return p


def _weights_on_disk(source: str) -> Path | None:
    path = Path(source).expanduser()
    return path if path.is_dir() else None


def bench_speed_main(argv: Sequence[str]) -> int:
    """``gqa-prune bench-speed``: measure dense, free it, measure pruned; print the table."""
    from gqa_prune.evaluation.efficiency import (
        check_speed_settings,
        format_speed_table,
        measure_speed,
        speedup,
    )
    from gqa_prune.io_utils import write_json_atomic
    from gqa_prune.models.loading import load_model
    from gqa_prune.reporting.experiment import setup_logging

    args = build_speed_parser().parse_args(list(argv))
    if not Path(args.pruned).expanduser().is_dir():
        raise GQAPruneError(f"--pruned {args.pruned} is not a folder; pass a saved pruned model")
    check_speed_settings(
        args.prompt_len, args.new_tokens, args.batch_size, args.repeats, args.warmup
    )
    setup_logging(None, verbose=False)
    logging.getLogger("gqa_prune").setLevel(logging.WARNING)
    settings = dict(
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        batch_size=args.batch_size,
        repeats=args.repeats,
        warmup=args.warmup,
        seed=args.seed,
    )
    results = []
    for label, source in (("dense", args.base_model), ("pruned", args.pruned)):
        model, _ = load_model(source, dtype=args.dtype, device=args.device)
        results.append(
            measure_speed(model, label=label, checkpoint=_weights_on_disk(source), **settings)
        )
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if args.output:
        write_json_atomic(
            args.output,
            {
                "dense": results[0].to_dict(),
                "pruned": results[1].to_dict(),
                "pruned_over_dense": speedup(*results),
            },
        )
    print(format_speed_table(results))
    return 0
