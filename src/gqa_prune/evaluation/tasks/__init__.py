"""The standard zero-shot suite of pruning papers as lm-eval tasks that read local files.

PIQA, ARC-Easy, ARC-Challenge, BoolQ, WinoGrande and OpenBookQA, with the prompts, choices,
targets and metrics of lm-evaluation-harness 0.4.13's stock tasks (the YAML files beside
this module); only the data source changes: JSON-lines files with the Hugging Face column
names, one per task and split::

    <folder>/<task>/<split>.jsonl      e.g. zeroshot/arc_easy/test.jsonl

Two splits, never mixed:

- ``test``: the items lm-eval scores and papers report (ARC and OpenBookQA: ``test.jsonl``;
  PIQA, BoolQ and WinoGrande: ``validation.jsonl``, as lm-eval, their test labels being
  hidden).
- ``validation``: held-out items for choosing settings, only where a task has them apart
  from the reported ones (ARC-Easy, ARC-Challenge, OpenBookQA: ``validation.jsonl``).

Nothing here imports lm-eval; :func:`local_task_config` returns the task as a config dict
that ``lm_eval.simple_evaluate`` accepts in its task list.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from gqa_prune.data import data_dir_setting
from gqa_prune.errors import GQAPruneError

ZeroShotSplit = Literal["test", "validation"]
SPLITS: tuple[str, ...] = ("test", "validation")

STANDARD_TASKS: tuple[str, ...] = (
    "piqa",
    "arc_easy",
    "arc_challenge",
    "boolq",
    "winogrande",
    "openbookqa",
)
# the group name that stands for all six (or, on the validation split, those that have one)
SUITE = "zeroshot6"

# task -> split -> file stem under <folder>/<task>/ (see the module docstring)
SPLIT_FILES: dict[str, dict[str, str]] = {
    "piqa": {"test": "validation"},
    "arc_easy": {"test": "test", "validation": "validation"},
    "arc_challenge": {"test": "test", "validation": "validation"},
    "boolq": {"test": "validation"},
    "winogrande": {"test": "validation"},
    "openbookqa": {"test": "test", "validation": "validation"},
}
VALIDATION_TASKS: tuple[str, ...] = tuple(
    t for t in STANDARD_TASKS if "validation" in SPLIT_FILES[t]
)

# the keys of a task config that say where the data comes from; everything else is the
# stock task's (prompt, choices, target, metrics)
DATA_KEYS = (
    "dataset_path",
    "dataset_name",
    "dataset_kwargs",
    "training_split",
    "validation_split",
    "test_split",
    "fewshot_split",
)
FOLDER = Path(__file__).parent


def choice_logprob(items: Sequence[tuple[int, Sequence[float]]]) -> float:
    """Mean over items of ``log softmax_i(ll_i)[gold]``, from the harness's ``likelihood``
    pass-through ``(gold, [ll_1..ll_k])``; items may differ in their number of choices."""
    total = 0.0
    for gold, lls in items:
        ll = np.asarray(lls, dtype=np.float64)
        top = ll.max()
        total += float(ll[gold] - top - np.log(np.exp(ll - top).sum()))
    return total / len(items) if items else float("nan")


# the harness's "likelihood" metric hands (gold, log-likelihoods) per item to the aggregation
CHOICE_LOGPROB_METRIC: dict[str, Any] = {
    "metric": "likelihood",
    "aggregation": choice_logprob,
    "higher_is_better": True,
}


def check_split(split: str) -> None:
    """Raise a one-line error unless ``split`` is ``test`` or ``validation``."""
    if split not in SPLITS:
        raise GQAPruneError(f"unknown zero-shot split '{split}'; choose test or validation")


def expand_suite(names: Sequence[str], split: str = "test") -> tuple[str, ...]:
    """Replace the group name :data:`SUITE` by its tasks; other names pass through.

    On the ``validation`` split the group stands for :data:`VALIDATION_TASKS`.

    Raises:
        GQAPruneError: a name appears twice after the expansion.
    """
    check_split(split)
    group = STANDARD_TASKS if split == "test" else VALIDATION_TASKS
    out: list[str] = []
    for name in names:
        out += list(group) if name == SUITE else [name]
    repeated = sorted({t for t in out if out.count(t) > 1})
    if repeated:
        raise GQAPruneError(
            f"--eval_tasks names {', '.join(repeated)} more than once (the group {SUITE} "
            f"stands for {','.join(group)})"
        )
    return tuple(out)


def zeroshot_folder(
    zeroshot_data_dir: str | Path | None = None, data_dir: str | Path | None = None
) -> Path | None:
    """Where the local task files are: ``zeroshot_data_dir``, else ``<data dir>/zeroshot``.

    The data directory is ``data_dir``, else ``$GQA_PRUNE_DATA_DIR``; its ``zeroshot/``
    sub-folder counts only if it exists. None = no local data (the hub's tasks are used).

    Raises:
        GQAPruneError: ``zeroshot_data_dir`` is given but is not a folder.
    """
    if zeroshot_data_dir is not None:
        folder = Path(zeroshot_data_dir).expanduser()
        if not folder.is_dir():
            raise GQAPruneError(
                f"--zeroshot_data_dir {zeroshot_data_dir} is not a folder; pass the folder "
                "holding <task>/<split>.jsonl (e.g. DATA/zeroshot)"
            )
        return folder
    root = data_dir_setting(data_dir)
    if root is not None and (root / "zeroshot").is_dir():
        return root.expanduser() / "zeroshot"
    return None


def task_file(folder: str | Path, task: str, split: str = "test") -> Path:
    """The JSON-lines file of ``task`` on ``split`` under ``folder``.

    Raises:
        GQAPruneError: the task is not one of :data:`STANDARD_TASKS`, it has no file for
            this split, or the file does not exist (the message names the path).
    """
    check_split(split)
    if task not in SPLIT_FILES:
        raise GQAPruneError(
            f"zero-shot task '{task}' has no local definition; local files serve "
            f"{', '.join(STANDARD_TASKS)}"
        )
    stem = SPLIT_FILES[task].get(split)
    if stem is None:
        raise GQAPruneError(
            f"zero-shot task {task} has no validation items apart from its reported ones; "
            f"the validation split covers {', '.join(VALIDATION_TASKS)}"
        )
    path = Path(folder) / task / f"{stem}.jsonl"
    if not path.is_file():
        raise GQAPruneError(
            f"zero-shot task {task} ({split} split): no file {path}; put the task's JSON-lines "
            "file there or point --zeroshot_data_dir to the folder that holds it"
        )
    return path


def _function(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    # lm-eval's `!function module.name` tag, the module being a file beside the YAML files
    module, _, name = str(loader.construct_scalar(node)).rpartition(".")  # type: ignore[arg-type]
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


class _TaskLoader(yaml.SafeLoader):
    pass


_TaskLoader.add_constructor("!function", _function)


def load_task_yaml(task: str) -> dict[str, Any]:
    """The shipped task definition of ``task`` (no data source), ``!function`` resolved."""
    path = FOLDER / f"{task}.yaml"
    if task not in SPLIT_FILES or not path.is_file():
        raise GQAPruneError(
            f"zero-shot task '{task}' has no local definition; choose from "
            f"{', '.join(STANDARD_TASKS)}"
        )
    with path.open(encoding="utf-8") as f:
        return dict(yaml.load(f, Loader=_TaskLoader))  # noqa: S506  # SafeLoader + one tag


def local_task_config(task: str, folder: str | Path, split: str = "test") -> dict[str, Any]:
    """``task`` as an lm-eval config dict reading only its ``split`` file under ``folder``.

    The file is the task's only split (``test_split`` or ``validation_split``, by the
    file's name, as lm-eval scores it); no training split, so local tasks are zero-shot.

    Raises:
        GQAPruneError: see :func:`task_file`.
    """
    path = task_file(folder, task, split)
    key = SPLIT_FILES[task][split]  # "test" or "validation": the lm-eval split name
    config = load_task_yaml(task)
    # beside the stock metrics: the log-probability of the right choice, a smooth measure
    # that still separates models whose accuracy sits at chance (see evaluation/zeroshot.py)
    metrics = list(config.get("metric_list", []))
    if not any(m.get("metric") == "likelihood" for m in metrics):
        metrics.append(CHOICE_LOGPROB_METRIC)
    config["metric_list"] = metrics
    config.update(
        dataset_path="json",
        dataset_name=None,
        dataset_kwargs={"data_files": {key: str(path.resolve())}},
        training_split=None,
        validation_split=key if key == "validation" else None,
        test_split=key if key == "test" else None,
        fewshot_split=None,
    )
    return config


__all__ = [
    "CHOICE_LOGPROB_METRIC",
    "choice_logprob",
    "DATA_KEYS",
    "SPLIT_FILES",
    "STANDARD_TASKS",
    "SUITE",
    "VALIDATION_TASKS",
    "ZeroShotSplit",
    "expand_suite",
    "load_task_yaml",
    "local_task_config",
    "task_file",
    "zeroshot_folder",
]
