"""Zero-shot accuracy per task: dense vs pruned vs recovered, as grouped bars."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

from gqa_prune.reporting.plots import plt

# summary.json stage -> label in the figure
STAGE_LABELS = {"before": "dense", "after": "pruned", "after_finetune": "recovered"}


def _score(task: Mapping[str, Any]) -> float | None:
    value = task.get("acc_norm")
    return task.get("acc") if value is None else value


def bar_values(
    zeroshot: Mapping[str, Mapping[str, Any]],
) -> tuple[list[str], dict[str, list[float | None]]]:
    """Bar labels (tasks, then ``mean``) and per stage label (dense, pruned, recovered) the
    bar heights: acc_norm, or acc where a task has no acc_norm; the mean is ``mean_score``."""
    names: list[str] = []
    for r in zeroshot.values():
        names += [n for n in r.get("requested") or r["tasks"] if n not in names]
    values = {
        STAGE_LABELS.get(stage, stage): [_score(r["tasks"].get(n, {})) for n in names]
        + [r.get("mean_score")]
        for stage, r in zeroshot.items()
    }
    return [*names, "mean"], values


def zeroshot_bars_png(zeroshot: Mapping[str, Mapping[str, Any]]) -> bytes:
    """PNG bytes: per task (and the mean) one bar per stage (see :func:`bar_values`).

    Args:
        zeroshot: ``summary.json``'s ``"zeroshot"``: stage -> ``ZeroShotResult.to_dict()``.
    """
    labels, values = bar_values(zeroshot)
    stages = list(values)
    width = 0.8 / max(1, len(stages))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels)), 3.6))
    for k, stage in enumerate(stages):
        xs = [i + (k - (len(stages) - 1) / 2) * width for i in range(len(labels))]
        bars = [(x, v) for x, v in zip(xs, values[stage], strict=True) if v is not None]
        ax.bar([x for x, _ in bars], [v for _, v in bars], width, label=stage)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=20, ha="right")
    ax.set_ylabel("acc_norm (acc where none)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="upper right", fontsize=8)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buf.getvalue()


__all__ = ["STAGE_LABELS", "zeroshot_bars_png"]
