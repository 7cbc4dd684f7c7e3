"""Paired comparison of two saved zero-shot results (``bench_quality.py --save_items DIR``).

Prints per task the two means, their difference ``A - B`` and its standard error paired by
item and as if unpaired (:mod:`gqa_prune.evaluation.paired`), then the task mean over all
tasks and over the tasks without BoolQ (whose pruned-model scores move with a yes/no bias
rather than knowledge, see docs/benchmarks.md). ``--metric logprob`` compares the
right-choice log-probability instead of the score.

    python bench/compare_items.py items/smollm2-135m_total_0.25__default.json \\
        items/smollm2-135m_total_0.25__default@pruning_distribution-2_8.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gqa_prune.errors import GQAPruneError
from gqa_prune.evaluation.paired import Difference, paired_difference, task_mean
from gqa_prune.evaluation.zeroshot import ZeroShotResult


def load(path: str) -> ZeroShotResult:
    """A saved result; a one-line error if the file is missing or not a saved result."""
    if not Path(path).is_file():
        raise GQAPruneError(f"{path}: no such file; give a file written by --save_items DIR")
    try:
        return ZeroShotResult.from_dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise GQAPruneError(
            f"{path}: not a saved zero-shot result ({type(exc).__name__}); "
            "write one with bench_quality.py --save_items DIR"
        ) from exc


def row(name: str, d: Difference, scale: float) -> str:
    z = d.diff / d.se if d.se > 0 else float("nan")
    return (
        f"| {name} | {d.n} | {d.a * scale:.2f} | {d.b * scale:.2f} | {d.diff * scale:+.2f} | "
        f"{d.se * scale:.2f} | {d.se_unpaired * scale:.2f} | {z:+.1f} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", help="result A (JSON from --save_items)")
    p.add_argument("b", help="result B, the same items")
    p.add_argument("--metric", choices=["score", "logprob"], default="score")
    p.add_argument("--tasks", help="comma-separated tasks (default: A's requested tasks)")
    args = p.parse_args()
    try:
        a, b = load(args.a), load(args.b)
        tasks = args.tasks.split(",") if args.tasks else list(a.requested)
        per_task, mean = paired_difference(a, b, tasks, args.metric)
    except GQAPruneError as exc:
        sys.exit(f"error: {exc}")
    rest = [t for t in tasks if t != "boolq"]
    without = task_mean([per_task[t] for t in rest]) if rest and len(rest) < len(tasks) else None
    scale = 100.0 if args.metric == "score" else 1.0
    unit = "points" if args.metric == "score" else "nats"
    print(f"A = {args.a}\nB = {args.b}\n{args.metric} in {unit}; z = (A - B) / paired se\n")
    print("| task | items | A | B | A - B | paired se | unpaired se | z |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, d in per_task.items():
        print(row(name, d, scale))
    print(row(f"mean, {len(tasks)} tasks", mean, scale))
    if without is not None:
        print(row(f"mean, {len(rest)} tasks without boolq", without, scale))


if __name__ == "__main__":
    main()
