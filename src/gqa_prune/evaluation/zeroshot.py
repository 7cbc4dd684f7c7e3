"""Zero-shot accuracy through lm-evaluation-harness, on the model already in memory.

The harness (``pip install 'gqa-prune[eval]'``) is imported lazily: nothing here needs it
until a task is evaluated. The model is wrapped as it is (``HFLM(pretrained=model)``): no
reload from disk, so a pruned model with per-layer head counts is evaluated directly.

For a multiple-choice item with context ``c`` and choices ``x_1..x_k`` the harness scores
``ll_i = sum_t log p(x_i[t] | c, x_i[<t])`` and reports::

    acc      = mean over items of [argmax_i ll_i == gold]
    acc_norm = mean over items of [argmax_i ll_i / len(x_i in characters) == gold]

Task data comes from the Hugging Face hub (the harness's own task configs) unless a task
folder of YAML files (``include_path``) points at local files.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from gqa_prune.errors import GQAPruneError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'gqa-prune[eval]'"


def require_lm_eval() -> ModuleType:
    """Import ``lm_eval`` or raise a one-line :class:`GQAPruneError` saying how to install it."""
    try:
        import lm_eval  # type: ignore[import-untyped]
        import lm_eval.models.huggingface  # type: ignore[import-untyped]  # noqa: F401
        import lm_eval.tasks  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        raise GQAPruneError(f"--eval_tasks needs lm-evaluation-harness: {INSTALL_HINT}") from None
    return lm_eval


def parse_tasks(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"boolq,piqa"`` (or a list) -> ``("boolq", "piqa")``; empty or repeated names raise."""
    names = text.split(",") if isinstance(text, str) else list(text)
    tasks = tuple(n.strip() for n in names)
    if not tasks or any(not t for t in tasks):
        raise GQAPruneError(
            f"--eval_tasks '{text}' has an empty task name; pass comma-separated names, "
            "e.g. boolq,piqa"
        )
    repeated = sorted({t for t in tasks if tasks.count(t) > 1})
    if repeated:
        raise GQAPruneError(f"--eval_tasks names {', '.join(repeated)} more than once")
    return tasks


def task_manager(tasks: Sequence[str], include_path: str | Path | None = None) -> Any:
    """A harness ``TaskManager`` that knows every name in ``tasks``.

    Only ``include_path`` is indexed when it holds all the tasks (indexing the harness's
    ~15,000 built-in configs takes seconds); otherwise the built-ins are added.

    Raises:
        GQAPruneError: lm-eval is missing, ``include_path`` is not a folder, or a task
            name is unknown (the message suggests close names).
    """
    import difflib

    require_lm_eval()
    from lm_eval.tasks import TaskManager  # type: ignore[import-untyped]

    if include_path is not None and not Path(include_path).is_dir():
        raise GQAPruneError(
            f"--eval_include_path {include_path} is not a folder; pass a folder of task YAML files"
        )
    manager = None
    if include_path is not None:
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        if any(t not in manager.all_tasks for t in tasks):
            manager = None
    if manager is None:
        manager = TaskManager(include_path=None if include_path is None else str(include_path))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        hints = {t: difflib.get_close_matches(t, manager.all_tasks, n=3) for t in unknown}
        said = "; ".join(
            f"'{t}'" + (f" (did you mean {', '.join(h)}?)" if h else "") for t, h in hints.items()
        )
        raise GQAPruneError(
            f"unknown lm-eval task {said}; see `lm-eval ls tasks`, or pass a folder of task YAML "
            "files with --eval_include_path"
        )
    return manager


@dataclass(frozen=True)
class TaskScore:
    """One task's scores; a metric the task does not define is None."""

    acc: float | None
    acc_norm: float | None
    acc_stderr: float | None
    acc_norm_stderr: float | None
    num_samples: int | None


@dataclass(frozen=True)
class ZeroShotResult:
    """Per-task acc / acc_norm and their means over the requested tasks that define them.

    Attributes:
        tasks: requested task name (and, for a group, each sub-task) -> scores.
        mean_acc: mean of ``acc`` over the requested tasks (None if none has it).
        mean_acc_norm: mean of ``acc_norm`` likewise.
        num_fewshot: in-context examples (0 = zero-shot).
        limit: items per task (None = all).
        lm_eval_version: version of the harness that computed the numbers.
    """

    tasks: dict[str, TaskScore]
    mean_acc: float | None
    mean_acc_norm: float | None
    num_fewshot: int
    limit: int | float | None
    lm_eval_version: str
    requested: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["requested"] = list(self.requested)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ZeroShotResult:
        tasks = {k: TaskScore(**v) for k, v in d["tasks"].items()}
        rest = {k: v for k, v in d.items() if k not in ("tasks", "requested")}
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
    )


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def evaluate_zeroshot(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str] | str,
    *,
    batch_size: int = 8,
    limit: int | float | None = None,
    include_path: str | Path | None = None,
    num_fewshot: int = 0,
    seed: int = 1234,
    manager: Any = None,
) -> ZeroShotResult:
    """Run lm-evaluation-harness tasks on ``model`` as it is in memory.

    The global RNG states (``random``, NumPy, torch) are restored afterwards, so running an
    evaluation does not change what a seeded run does next. The tokenizer is copied
    (the harness may set a padding token on it).

    Args:
        model: a causal LM (pruned or not) on any device.
        tokenizer: its tokenizer.
        tasks: harness task names, e.g. ``("boolq", "piqa")``, or ``"boolq,piqa"``.
        batch_size: sequences per forward pass.
        limit: items per task (an int) or a fraction of each task; None = all.
        include_path: folder of extra task YAML files (local tasks, offline use).
        num_fewshot: in-context examples; 0 = zero-shot.
        seed: seed of the harness (sampling of few-shot examples and of ``limit``).
        manager: a :func:`task_manager` built earlier for these tasks (saves the indexing).

    Raises:
        GQAPruneError: lm-eval is not installed, a task is unknown, or a task's data
            cannot be loaded (no network and no local copy).
    """
    import copy

    names = parse_tasks(tasks)
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM  # type: ignore[import-untyped]

    if manager is None:
        manager = task_manager(names, include_path)
    was_training = model.training
    hflm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            out = lm_eval.simple_evaluate(
                model=hflm,
                tasks=list(names),
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=manager,
                log_samples=False,
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
            "fetches task data from the Hugging Face hub; needs network or a local task folder)"
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
    )
    log.info(
        "zero-shot (%s): mean acc %s, mean acc_norm %s",
        ",".join(names),
        _fmt(result.mean_acc),
        _fmt(result.mean_acc_norm),
    )
    return result


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def format_zeroshot_table(results: dict[str, ZeroShotResult]) -> str:
    """Text table: one row per task, columns ``acc/acc_norm`` per stage (before, after, ...)."""
    stages = list(results)
    if not stages:
        return ""
    names = list(next(iter(results.values())).tasks)
    for r in results.values():
        names += [n for n in r.tasks if n not in names]
    header = ["task", *(f"{s} acc / acc_norm" for s in stages)]
    rows = [header]
    for n in [*names, "mean"]:
        row = [n]
        for r in results.values():
            if n == "mean":
                a, b = r.mean_acc, r.mean_acc_norm
            else:
                s = r.tasks.get(n)
                a, b = (s.acc, s.acc_norm) if s else (None, None)
            row.append(f"{_fmt(a)} / {_fmt(b)}")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


__all__ = [
    "TaskScore",
    "ZeroShotResult",
    "evaluate_zeroshot",
    "format_zeroshot_table",
    "parse_tasks",
    "require_lm_eval",
    "task_manager",
]
