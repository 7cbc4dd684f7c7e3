"""Plots of an experiment (matplotlib, headless Agg backend), written atomically."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from gqa_prune.allocation import Allocation  # noqa: E402


def _save_atomic(fig: plt.Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)


def plot_pruning_strategy(
    path: str | Path,
    allocation: Allocation,
    layer_importance: Sequence[float] | None,
    title: str = "",
) -> Path:
    """Per-layer importance (top) and attention / MLP / combined pruning rates (bottom)."""
    path = Path(path)
    layers = [la.layer for la in allocation.layers]
    fig, (ax_imp, ax_rate) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    if layer_importance is not None:
        ax_imp.bar(layers, list(layer_importance), color="tab:gray")
    ax_imp.set_ylabel("layer importance")
    ax_imp.set_title(title or "per-layer importance and pruning rates")
    ax_rate.plot(
        layers, [100 * la.attention_rate for la in allocation.layers], "o-", label="attention"
    )
    ax_rate.plot(layers, [100 * la.mlp_rate for la in allocation.layers], "s-", label="MLP")
    ax_rate.plot(layers, [100 * la.rate for la in allocation.layers], "k--", label="attention+MLP")
    ax_rate.axhline(
        100 * allocation.target_ratio,
        color="tab:red",
        lw=0.8,
        label=f"target {100 * allocation.target_ratio:.1f}% of "
        f"{allocation.pruning_ratio_basis.replace('_', '-')} params",
    )
    ax_rate.set_xlabel("layer")
    ax_rate.set_ylabel("removed (%)")
    ax_rate.legend(loc="best", fontsize=8)
    ax_rate.grid(alpha=0.3)
    _save_atomic(fig, path)
    return path
