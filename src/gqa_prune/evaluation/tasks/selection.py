"""Which zero-shot tasks run and where their data comes from: names checked, the group name
expanded, local files found, the lm-eval ``TaskManager`` built; before any model runs.

lm-eval is imported lazily, inside the functions that need it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from gqa_prune.data import data_dir_setting
from gqa_prune.errors import GQAPruneError
from gqa_prune.evaluation.tasks import (
    STANDARD_TASKS,
    expand_suite,
    local_task_config,
    zeroshot_folder,
)

log = logging.getLogger("gqa_prune.evaluation.zeroshot")
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")

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


def parse_tasks(text: str | Sequence[str], split: str = "test") -> tuple[str, ...]:
    """``"boolq,piqa"`` (or a list) -> ``("boolq", "piqa")``; empty or repeated names raise.

    The group name ``zeroshot6`` expands to the standard suite (on ``split="validation"``,
    to its tasks that have validation files).
    """
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
    return expand_suite(tasks, split)


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
class TaskSelection:
    """Tasks resolved once (names checked, local files found) for one or more evaluations.

    Attributes:
        names: the task names, the group name expanded.
        specs: what the harness gets per name: the name itself (hub or ``include_path``)
            or a config dict reading local files.
        sources: name -> ``"local <file>"`` or ``"lm-eval"`` (the harness's own task).
        split: ``test`` (reported items) or ``validation`` (for choosing settings).
        manager: the harness ``TaskManager`` that loads them.
    """

    names: tuple[str, ...]
    specs: tuple[str | dict[str, Any], ...]
    sources: dict[str, str]
    split: str
    manager: Any


def _hub_offline() -> bool:
    return any(os.environ.get(v, "0") not in ("", "0") for v in OFFLINE_ENV)


def prepare_tasks(
    tasks: Sequence[str] | str,
    *,
    split: str = "test",
    zeroshot_data_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    include_path: str | Path | None = None,
) -> TaskSelection:
    """Resolve task names to local or hub tasks; check everything before any model runs.

    With a zero-shot data folder (``zeroshot_data_dir``, else ``<data_dir>/zeroshot``,
    ``data_dir`` defaulting to ``$GQA_PRUNE_DATA_DIR``) the standard tasks read its files;
    without one they are lm-eval's own (hub) tasks. ``split="validation"`` needs the folder.

    Raises:
        GQAPruneError: lm-eval is missing, a name is unknown, a local file is missing (the
            message names the task and the path), or the validation split has no folder.
    """
    names = parse_tasks(tasks, split)
    require_lm_eval()
    from lm_eval.tasks import TaskManager  # type: ignore[import-untyped]

    folder = zeroshot_folder(zeroshot_data_dir, data_dir)
    if split != "test" and folder is None:
        raise GQAPruneError(
            "the validation split reads local files only: set --zeroshot_data_dir or "
            "--data_dir (a folder with zeroshot/<task>/validation.jsonl)"
        )
    specs: list[str | dict[str, Any]] = []
    sources: dict[str, str] = {}
    local: list[str] = []
    for name in names:
        if folder is not None and name in STANDARD_TASKS:
            config = local_task_config(name, folder, split)
            specs.append(config)
            sources[name] = f"local {next(iter(config['dataset_kwargs']['data_files'].values()))}"
            local.append(name)
        elif split != "test":
            raise GQAPruneError(
                f"the validation split runs only local files of {', '.join(STANDARD_TASKS)}; "
                f"not {name}"
            )
        elif name in STANDARD_TASKS and _hub_offline():
            looked = zeroshot_data_dir or data_dir_setting(data_dir)
            where = f"{looked}/zeroshot" if looked else "no data directory set"
            raise GQAPruneError(
                f"zero-shot task {name}: no local files ({where}) and the hub is offline "
                "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); set --zeroshot_data_dir or --data_dir "
                "to a folder with zeroshot/<task>/<split>.jsonl"
            )
        else:
            specs.append(name)
            sources[name] = "lm-eval"
    hub = [n for n in names if n not in local]
    if hub:
        manager = task_manager(hub, include_path)
    else:  # nothing to index: the configs are given whole
        manager = TaskManager(include_path=None, include_defaults=False)
    if local:
        log.info("zero-shot: %s from local files under %s", ",".join(local), folder)
    return TaskSelection(names, tuple(specs), sources, split, manager)


__all__ = [
    "INSTALL_HINT",
    "TaskSelection",
    "parse_tasks",
    "prepare_tasks",
    "require_lm_eval",
    "task_manager",
]
