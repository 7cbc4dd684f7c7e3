"""``finetune_loss.png``: the training loss of a recovery run per optimizer step."""

from __future__ import annotations

import math
from pathlib import Path

from gqa_prune.recovery.config import FinetuneResult
from gqa_prune.reporting.plots import _save_atomic, plt


def plot_finetune_loss(path: str | Path, result: FinetuneResult, title: str = "") -> Path:
    """Loss per step (and, for distillation, its KL and CE terms); the stop step if any."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    hist = result.loss_history
    steps = [h["step"] for h in hist]
    finite = [h["loss"] if math.isfinite(h["loss"]) else float("nan") for h in hist]
    ax.plot(steps, finite, "-", color="k", label="loss")
    for key, style in (("kl", "tab:blue"), ("ce", "tab:orange")):
        if hist and key in hist[0]:
            ax.plot(
                steps,
                [h.get(key, float("nan")) for h in hist],
                "-",
                color=style,
                alpha=0.7,
                label=f"{key.upper()} term",
            )
    if result.stopped_at_step is not None:
        ax.axvline(
            result.stopped_at_step,
            color="tab:red",
            lw=1,
            label=f"non-finite at step {result.stopped_at_step}",
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title or f"recovery fine-tuning ({result.method})")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    _save_atomic(fig, path)
    return path
