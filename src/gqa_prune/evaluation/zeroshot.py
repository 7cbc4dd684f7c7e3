"""Zero-shot accuracy through lm-evaluation-harness, on the model already in memory.

The harness (``pip install 'gqa-prune[eval]'``) is imported lazily: nothing here needs it
until a task is evaluated. The model is wrapped as it is (``HFLM(pretrained=model)``): no
reload from disk, so a pruned model with per-layer head counts is evaluated directly.

For a multiple-choice item with context ``c`` and choices ``x_1..x_k`` the harness scores
``ll_i = sum_t log p(x_i[t] | c, x_i[<t])`` and reports::

    acc      = mean over items of [argmax_i ll_i == gold]
    acc_norm = mean over items of [argmax_i ll_i / len(x_i in characters) == gold]
    logprob  = mean over items of log softmax_i(ll_i)[gold]

The local tasks also report ``logprob``, the log-probability the model gives the right choice
among the choices (higher is better; 0 = certain and right; log(1/k) = a uniform guess between
k). Accuracy moves only when an argmax flips, so it shows nothing where a small pruned model
sits at chance (ARC-Challenge); ``logprob`` still moves with every item, which makes it the
finer measure for choosing settings on the small validation files.

Data: the standard pruning suite (``piqa``, ``arc_easy``, ``arc_challenge``, ``boolq``,
``winogrande``, ``openbookqa``; the group name ``zeroshot6`` stands for all six) runs from
local JSON-lines files when a zero-shot data folder is set (``zeroshot_data_dir``, else
``<data_dir>/zeroshot``; see :mod:`gqa_prune.evaluation.tasks`), with the stock prompts and
metrics. Other names, and the suite without local files, come from the Hugging Face hub
through the harness's own task configs, or from a folder of task YAML files
(``include_path``).

``split="validation"`` runs the held-out validation files (ARC-Easy, ARC-Challenge,
OpenBookQA) for choosing settings; the reported items are never among them.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gqa_prune.errors import GQAPruneError
from gqa_prune.evaluation.tasks import SUITE, choice_logprob
from gqa_prune.evaluation.tasks.selection import (
    TaskSelection,
    parse_tasks,
    prepare_tasks,
    require_lm_eval,
    task_manager,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskScore:
    """One task's scores; a metric the task does not define is None."""

    acc: float | None
    acc_norm: float | None
    acc_stderr: float | None
    acc_norm_stderr: float | None
    num_samples: int | None
    logprob: float | None = None

    @property
    def score(self) -> float | None:
        """``acc_norm`` where the task reports it, else ``acc`` (BoolQ, WinoGrande)."""
        return self.acc if self.acc_norm is None else self.acc_norm


@dataclass(frozen=True)
class ZeroShotResult:
    """Per-task acc / acc_norm and their means over the requested tasks that define them.

    Attributes:
        tasks: requested task name (and, for a group, each sub-task) -> scores.
        mean_acc: mean of ``acc`` over the requested tasks (None if none has it).
        mean_acc_norm: mean of ``acc_norm`` likewise.
        num_fewshot: in-context examples (0 = zero-shot).
        limit: items per task, the first ones (None = all).
        lm_eval_version: version of the harness that computed the numbers.
        requested: the task names evaluated (the group name expanded).
        split: ``test`` (the reported items) or ``validation`` (for choosing settings).
        sources: task -> ``"local <file>"`` or ``"lm-eval"`` (the harness's own data).
        items: with ``log_samples``, task -> ``{"doc_id": [...], "score": [...],
            "logprob": [...]}``, one entry per item in ``doc_id`` order (``score`` 1/0 by the
            task's score metric; ``logprob`` only where the task reports it); else empty.
    """

    tasks: dict[str, TaskScore]
    mean_acc: float | None
    mean_acc_norm: float | None
    num_fewshot: int
    limit: int | float | None
    lm_eval_version: str
    requested: tuple[str, ...] = ()
    split: str = "test"
    sources: dict[str, str] = field(default_factory=dict)
    items: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    @property
    def mean_score(self) -> float | None:
        """Mean over the requested tasks of acc_norm, or acc where a task has no acc_norm."""
        return _mean([self.tasks[n].score for n in self.requested if n in self.tasks])

    @property
    def mean_logprob(self) -> float | None:
        """Mean right-choice log-probability over the requested tasks that report it."""
        return _mean([self.tasks[n].logprob for n in self.requested if n in self.tasks])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["requested"] = list(self.requested)
        d["mean_score"] = self.mean_score
        d["mean_logprob"] = self.mean_logprob
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ZeroShotResult:
        tasks = {k: TaskScore(**v) for k, v in d["tasks"].items()}
        derived = ("tasks", "requested", "mean_score", "mean_logprob")
        rest = {k: v for k, v in d.items() if k not in derived}
        return cls(tasks=tasks, requested=tuple(d.get("requested", ())), **rest)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _task_score(metrics: dict[str, Any], num_samples: int | None) -> TaskScore:
    # the harness keys metrics as "<metric>,<filter>"; zero-shot multiple choice uses "none"
    def get(name: str) -> float | None:
        return _number(metrics.get(f"{name},none", metrics.get(name)))

    return TaskScore(
        acc=get("acc"),
        acc_norm=get("acc_norm"),
        acc_stderr=get("acc_stderr"),
        acc_norm_stderr=get("acc_norm_stderr"),
        num_samples=num_samples,
        logprob=get("likelihood"),
    )


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def evaluate_zeroshot(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str] | str | TaskSelection,
    *,
    batch_size: int = 8,
    limit: int | float | None = None,
    split: str = "test",
    zeroshot_data_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    include_path: str | Path | None = None,
    num_fewshot: int = 0,
    seed: int = 1234,
    log_samples: bool = False,
) -> ZeroShotResult:
    """Run lm-evaluation-harness tasks on ``model`` as it is in memory.

    The global RNG states (``random``, NumPy, torch) are restored afterwards, so running an
    evaluation does not change what a seeded run does next. The tokenizer is copied
    (the harness may set a padding token on it).

    Args:
        model: a causal LM (pruned or not) on any device.
        tokenizer: its tokenizer.
        tasks: harness task names, e.g. ``("boolq", "piqa")``, ``"boolq,piqa"`` or
            ``"zeroshot6"``, or a :class:`TaskSelection` from :func:`prepare_tasks` (then
            ``split``, the data folders and ``include_path`` are those it was made with).
        batch_size: sequences per forward pass.
        limit: the first ``limit`` items of each task (an int), or a fraction; None = all.
        split: ``test`` (reported items) or ``validation`` (held-out files, for choosing
            settings; local data only).
        zeroshot_data_dir: folder of ``<task>/<split>.jsonl`` files.
        data_dir: data directory whose ``zeroshot/`` folder is used when
            ``zeroshot_data_dir`` is None (default ``$GQA_PRUNE_DATA_DIR``).
        include_path: folder of extra task YAML files (other local tasks).
        num_fewshot: in-context examples; 0 = zero-shot (local tasks are zero-shot only).
        seed: seed of the harness (sampling of few-shot examples).
        log_samples: also keep each item's score and right-choice log-probability
            (``result.items``), for a paired comparison of two models on the same items
            (:func:`gqa_prune.evaluation.paired.paired_difference`).

    Raises:
        GQAPruneError: lm-eval is not installed, a task is unknown, a local file is
            missing, or a task's data cannot be loaded (no network and no local copy).
    """
    import copy

    selection = (
        tasks
        if isinstance(tasks, TaskSelection)
        else prepare_tasks(
            tasks,
            split=split,
            zeroshot_data_dir=zeroshot_data_dir,
            data_dir=data_dir,
            include_path=include_path,
        )
    )
    names = selection.names
    if num_fewshot and any(isinstance(s, dict) for s in selection.specs):
        raise GQAPruneError(
            f"num_fewshot {num_fewshot}: the local tasks have no training split to draw "
            "examples from; use num_fewshot=0"
        )
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM  # type: ignore[import-untyped]

    was_training = model.training
    hflm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            out = lm_eval.simple_evaluate(
                model=hflm,
                tasks=list(selection.specs),
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=selection.manager,
                log_samples=log_samples,
                bootstrap_iters=1000,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
    except (ConnectionError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GQAPruneError(
            f"cannot load the data of --eval_tasks {','.join(names)}: {first} (the harness "
            "fetches task data from the Hugging Face hub; needs network, or local files: "
            f"--zeroshot_data_dir DIR with <task>/<split>.jsonl for {SUITE}, or a folder of "
            "task YAML files with --eval_include_path)"
        ) from exc
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        model.train(was_training)
    if out is None:  # only non-zero ranks of a distributed run get None
        raise GQAPruneError("lm-eval returned no results (not the main process)")
    counts = out.get("n-samples", {})
    scores = {
        name: _task_score(metrics, counts.get(name, {}).get("effective"))
        for name, metrics in out["results"].items()
    }
    top = [scores[n] for n in names if n in scores]
    result = ZeroShotResult(
        tasks=scores,
        mean_acc=_mean([s.acc for s in top]),
        mean_acc_norm=_mean([s.acc_norm for s in top]),
        num_fewshot=num_fewshot,
        limit=limit,
        lm_eval_version=str(getattr(lm_eval, "__version__", "unknown")),
        requested=names,
        split=selection.split,
        sources=dict(selection.sources),
        items=_items(out.get("samples") or {}, scores) if log_samples else {},
    )
    log.info(
        "zero-shot (%s, %s split): mean acc %s, mean acc_norm %s",
        ",".join(names),
        selection.split,
        _fmt(result.mean_acc),
        _fmt(result.mean_acc_norm),
    )
    return result


def _items(
    samples: dict[str, list[dict[str, Any]]], scores: dict[str, TaskScore]
) -> dict[str, dict[str, list[float]]]:
    """Per-item score (acc_norm where the task has it, else acc) and right-choice
    log-probability from the harness's logged samples, in ``doc_id`` order."""
    items = {}
    for name, rows in samples.items():
        rows = sorted(rows, key=lambda r: int(r["doc_id"]))
        key = "acc" if name in scores and scores[name].acc_norm is None else "acc_norm"
        entry: dict[str, list[float]] = {
            "doc_id": [float(r["doc_id"]) for r in rows],
            "score": [float(r[key]) for r in rows],
        }
        if rows and all("likelihood" in r for r in rows):
            entry["logprob"] = [choice_logprob([r["likelihood"]]) for r in rows]
        items[name] = entry
    return items


def _diff(dense: float | None, other: float | None) -> float | None:
    return None if dense is None or other is None else dense - other


def zeroshot_drop(dense: ZeroShotResult, other: ZeroShotResult) -> dict[str, Any]:
    """Drop from the dense model, ``dense - other`` per task and mean (positive = lost).

    Returns:
        ``{"tasks": {name: {"acc": d, "acc_norm": d}}, "mean_acc": d, "mean_acc_norm": d,
        "mean_score": d}``; None where either side lacks the metric.
    """
    tasks = {}
    for name, s in other.tasks.items():
        d = dense.tasks.get(name)
        tasks[name] = {
            "acc": _diff(d.acc if d else None, s.acc),
            "acc_norm": _diff(d.acc_norm if d else None, s.acc_norm),
        }
    return {
        "tasks": tasks,
        "mean_acc": _diff(dense.mean_acc, other.mean_acc),
        "mean_acc_norm": _diff(dense.mean_acc_norm, other.mean_acc_norm),
        "mean_score": _diff(dense.mean_score, other.mean_score),
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _pts(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f}"


def format_zeroshot_table(results: dict[str, ZeroShotResult]) -> str:
    """Text table: one row per task (then the means), ``acc / acc_norm`` per stage.

    Every stage after the first also gets a ``drop`` column: first stage minus it, in
    accuracy points (positive = lost), for ``acc / acc_norm``.
    """
    stages = list(results)
    if not stages:
        return ""
    first = results[stages[0]]
    names = list(first.tasks)
    for r in results.values():
        names += [n for n in r.tasks if n not in names]
    header = ["task", f"{stages[0]} acc / acc_norm"]
    for s in stages[1:]:
        header += [f"{s} acc / acc_norm", "drop (pts)"]
    rows = [header]

    def pair(r: ZeroShotResult, n: str) -> tuple[float | None, float | None]:
        if n == "mean":
            return r.mean_acc, r.mean_acc_norm
        t = r.tasks.get(n)
        return (t.acc, t.acc_norm) if t else (None, None)

    for n in [*names, "mean"]:
        a0, b0 = pair(first, n)
        row = [n, f"{_fmt(a0)} / {_fmt(b0)}"]
        for s in stages[1:]:
            a, b = pair(results[s], n)
            row += [f"{_fmt(a)} / {_fmt(b)}", f"{_pts(_diff(a0, a))} / {_pts(_diff(b0, b))}"]
        rows.append(row)
    row = ["mean score*", _fmt(first.mean_score)]  # the headline number per stage
    for s in stages[1:]:
        row += [_fmt(results[s].mean_score), _pts(_diff(first.mean_score, results[s].mean_score))]
    rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    limit = "all items" if first.limit is None else f"first {first.limit} items per task"
    note = f"* acc_norm, acc where a task has none; {first.split} split, {limit}, "
    note += f"{first.num_fewshot}-shot"
    if len(stages) > 1:
        note += f"; drop = {stages[0]} minus the stage (positive = lost)"
    lines.append(note)
    return "\n".join(lines)


__all__ = [
    "SUITE",
    "TaskScore",
    "TaskSelection",
    "ZeroShotResult",
    "evaluate_zeroshot",
    "format_zeroshot_table",
    "parse_tasks",
    "prepare_tasks",
    "require_lm_eval",
    "task_manager",
    "zeroshot_drop",
]
