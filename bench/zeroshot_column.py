"""A zero-shot column for the benchmarks: mean acc_norm (acc where a task has none) over the
standard suite, from the local files, on the first N items of each task.

Benchmarks run as ``python bench/bench_x.py`` (so ``bench/`` is on ``sys.path``) and use it as::

    from zeroshot_column import ZeroShotColumn, add_zeroshot_arguments

    add_zeroshot_arguments(parser)             # --zeroshot_limit N (0 = off), --zeroshot_split
    column = ZeroShotColumn.from_args(args)    # None when --zeroshot_limit 0
    ...
    row.append(column.cell(model, tok))        # e.g. "0.4312"; header: column.header

Splits: ``validation`` (default; ARC-Easy, ARC-Challenge, OpenBookQA validation files) for
benchmarks that choose settings, ``test`` (all six tasks, the reported items) for numbers that
are reported. Never choose a setting on the test column.

Standalone, one model: ``GQA_PRUNE_DATA_DIR=../shared/data python bench/zeroshot_column.py
--model smollm2-135m --zeroshot_limit 20 --zeroshot_split test`` prints the per-task table.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from typing import Any

from gqa_prune.evaluation.tasks import SUITE
from gqa_prune.evaluation.zeroshot import (
    TaskSelection,
    ZeroShotResult,
    evaluate_zeroshot,
    prepare_tasks,
)


def add_zeroshot_arguments(parser: argparse.ArgumentParser, default_limit: int = 0) -> None:
    """``--zeroshot_limit`` (items per task; 0 = no zero-shot column) and ``--zeroshot_split``."""
    parser.add_argument(
        "--zeroshot_limit",
        type=int,
        default=default_limit,
        help="zero-shot column: the first N items of each task (0 = no column)",
    )
    parser.add_argument(
        "--zeroshot_split",
        choices=["validation", "test"],
        default="validation",
        help="validation (ARC-e/ARC-c/OpenBookQA validation files: for choosing settings) "
        "or test (all six tasks, the reported items)",
    )
    parser.add_argument("--zeroshot_batch_size", type=int, default=8)


@dataclass
class ZeroShotColumn:
    """The standard suite prepared once; :meth:`cell` evaluates one model."""

    selection: TaskSelection
    limit: int | None
    batch_size: int = 8
    log_samples: bool = False

    @classmethod
    def create(
        cls,
        limit: int | None,
        split: str = "validation",
        data_dir: str | None = None,
        batch_size: int = 8,
        log_samples: bool = False,
        tasks: str = SUITE,
    ) -> ZeroShotColumn:
        """Resolve the tasks (local files under ``<data_dir>/zeroshot``) and check them;
        ``tasks`` is the suite or a comma-separated list of its task names."""
        selection = prepare_tasks(
            tasks, split=split, data_dir=data_dir or os.environ.get("GQA_PRUNE_DATA_DIR")
        )
        return cls(selection, limit, batch_size, log_samples)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ZeroShotColumn | None:
        if not args.zeroshot_limit:
            return None
        return cls.create(
            args.zeroshot_limit,
            args.zeroshot_split,
            getattr(args, "data_dir", None),
            args.zeroshot_batch_size,
        )

    @property
    def header(self) -> str:
        n = len(self.selection.names)
        return f"zs {self.selection.split} ({n} tasks, first {self.limit})"

    def evaluate(self, model: Any, tokenizer: Any) -> ZeroShotResult:
        return evaluate_zeroshot(
            model,
            tokenizer,
            self.selection,
            batch_size=self.batch_size,
            limit=self.limit,
            log_samples=self.log_samples,
        )

    def score(self, model: Any, tokenizer: Any) -> float | None:
        """Mean over the tasks of acc_norm (acc for BoolQ and WinoGrande)."""
        return self.evaluate(model, tokenizer).mean_score

    def cell(self, model: Any, tokenizer: Any) -> str:
        value = self.score(model, tokenizer)
        return "n/a" if value is None else f"{value:.4f}"


def main() -> None:
    from gqa_prune.evaluation.zeroshot import format_zeroshot_table
    from gqa_prune.models.loading import load_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data_dir", default=os.environ.get("GQA_PRUNE_DATA_DIR"))
    add_zeroshot_arguments(p, default_limit=20)
    args = p.parse_args()
    column = ZeroShotColumn.from_args(args)
    if column is None:
        p.error("--zeroshot_limit 0: nothing to evaluate")
    model, tok = load_model(args.model, device="cpu")
    t0 = time.perf_counter()
    result = column.evaluate(model, tok)
    print(format_zeroshot_table({args.model: result}))
    print(f"{column.header}: {result.mean_score:.4f} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
