"""Paired comparison of two models' zero-shot results on the same items.

Two pruned models of one dense model are evaluated on the same items, and most items are
answered alike by both (the easy ones right, the hard ones wrong). Comparing the two task means
as if they were independent counts that shared difficulty twice; the per-item difference does
not. For task ``t`` with ``n_t`` items, per-item values ``a_ti`` and ``b_ti`` (the score, 1 or 0,
or the right-choice log-probability) and ``d_ti = a_ti - b_ti``::

    D      = (1/T) Σ_t  mean_i d_ti                       (the difference of the task means)
    se(D)  = (1/T) sqrt(Σ_t var_i(d_ti) / n_t)            (paired, sample variance, ddof 1)
    se_u   = (1/T) sqrt(Σ_t (var_i(a_ti) + var_i(b_ti)) / n_t)   (as if unpaired)

``se(D) < se_u`` exactly when the items' values are positively correlated between the models,
so a difference too small to tell from the unpaired noise can still be told apart here.
Cost: O(Σ_t n_t).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gqa_prune.errors import GQAPruneError
from gqa_prune.evaluation.zeroshot import ZeroShotResult


@dataclass(frozen=True)
class Difference:
    """One difference ``a - b`` of means over items, with its paired and unpaired errors."""

    a: float
    b: float
    diff: float
    se: float
    se_unpaired: float
    n: int


def _values(
    result: ZeroShotResult, task: str, metric: str, label: str
) -> tuple[list[float], list[float]]:
    entry = result.items.get(task)
    if entry is None:
        have = ", ".join(sorted(result.items)) or "none"
        raise GQAPruneError(
            f"result {label} has no per-item scores for task {task} (it has: {have}); "
            "evaluate with log_samples=True (bench_quality.py --save_items DIR)"
        )
    if metric not in entry:
        raise GQAPruneError(f"result {label}, task {task}: no per-item {metric}")
    return entry["doc_id"], entry[metric]


def _task_difference(a: np.ndarray, b: np.ndarray) -> Difference:
    n = len(a)
    d = a - b
    ddof = 1 if n > 1 else 0
    return Difference(
        a=float(a.mean()),
        b=float(b.mean()),
        diff=float(d.mean()),
        se=math.sqrt(float(d.var(ddof=ddof)) / n),
        se_unpaired=math.sqrt((float(a.var(ddof=ddof)) + float(b.var(ddof=ddof))) / n),
        n=n,
    )


def paired_difference(
    a: ZeroShotResult,
    b: ZeroShotResult,
    tasks: Sequence[str] | None = None,
    metric: str = "score",
) -> tuple[dict[str, Difference], Difference]:
    """Per-task and task-mean difference ``a - b`` on the items both results scored.

    Args:
        a, b: results evaluated with ``log_samples=True`` on the same items.
        tasks: the tasks to compare (default: ``a``'s requested tasks).
        metric: ``score`` (acc_norm, or acc where a task has none) or ``logprob``.

    Returns:
        ``(per_task, mean)``; ``mean.n`` is the number of items over all tasks.

    Raises:
        GQAPruneError: a result lacks per-item values, or the two scored different items.
    """
    names = list(tasks) if tasks is not None else list(a.requested or a.items)
    if not names:
        raise GQAPruneError("no tasks to compare: name them or evaluate with log_samples=True")
    per_task = {}
    for task in names:
        ids_a, va = _values(a, task, metric, "a")
        ids_b, vb = _values(b, task, metric, "b")
        if list(ids_a) != list(ids_b):
            raise GQAPruneError(
                f"task {task}: the two results scored different items ({len(ids_a)} vs "
                f"{len(ids_b)}); evaluate both with the same split and item limit"
            )
        if not ids_a:
            raise GQAPruneError(f"task {task}: no items to compare")
        per_task[task] = _task_difference(np.asarray(va, np.float64), np.asarray(vb, np.float64))
    return per_task, task_mean(list(per_task.values()))


def task_mean(diffs: Sequence[Difference]) -> Difference:
    """The task mean of per-task differences (tasks independent: their variances add)."""
    t = len(diffs)
    return Difference(
        a=sum(d.a for d in diffs) / t,
        b=sum(d.b for d in diffs) / t,
        diff=sum(d.diff for d in diffs) / t,
        se=math.sqrt(sum(d.se**2 for d in diffs)) / t,
        se_unpaired=math.sqrt(sum(d.se_unpaired**2 for d in diffs)) / t,
        n=sum(d.n for d in diffs),
    )
