"""The split search's console table and plot (``gqa-prune search``)."""

from __future__ import annotations

import math
from pathlib import Path

from gqa_prune.evaluation.search import SearchResult
from gqa_prune.reporting.plots import _save_atomic, plt


def format_search_table(result: SearchResult) -> str:
    """Text table of the candidates; the best is marked with ``*``."""
    rows = [
        ["split a:m", "attention share", "removed", "attn removed", "MLP removed", "val ppl", ""]
    ]
    for i, c in enumerate(result.candidates):
        if c.ppl is None:
            rows.append([c.label, f"{c.attention_share:.2f}", "-", "-", "-", "infeasible", ""])
            continue
        rows.append(
            [
                c.label,
                f"{c.attention_share:.2f}",
                f"{100 * (c.achieved_ratio or 0):.2f}%",
                f"{100 * (c.attention_ratio or 0):.1f}%",
                f"{100 * (c.mlp_ratio or 0):.1f}%",
                f"{c.ppl:.3f}",
                "*" if i == result.best else "",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    v = result.validation
    lines.append(
        f"dense validation ppl {result.dense_ppl:.3f} ({v['num_tokens']:,} held-out tokens of "
        f"{v['dataset'] or 'the calibration text'}); best split {result.best_candidate.label}"
    )
    return "\n".join(lines)


def plot_search(path: str | Path, result: SearchResult, title: str = "") -> Path:
    """Validation perplexity against the attention share of the removed parameters."""
    path = Path(path)
    points = [(c.attention_share, c.ppl, c.label) for c in result.candidates if c.ppl is not None]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([x for x, _, _ in points], [y for _, y, _ in points], "o-", label="pruned")
    for x, y, label in points:
        ax.annotate(
            label, (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8
        )
    best = result.best_candidate
    ax.plot([best.attention_share], [best.ppl or math.nan], "r*", ms=14, label=f"best {best.label}")
    ax.axhline(result.dense_ppl, color="tab:gray", ls="--", lw=0.8, label="dense")
    ax.set_xlabel("attention share of the removed parameters  a / (a + m)")
    ax.set_ylabel("validation perplexity")
    ax.set_title(title or f"split search at {100 * result.pruning_ratio:.0f}% pruning")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    _save_atomic(fig, path)
    return path


__all__ = ["format_search_table", "plot_search"]
