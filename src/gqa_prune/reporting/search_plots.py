"""The split search's console table and plot (``gqa-prune search``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from gqa_prune.reporting.plots import _save_atomic, plt
from gqa_prune.search import ZEROSHOT_RANKINGS, Candidate, SearchResult


def _ranking_line(result: SearchResult) -> str:
    """Which data ranked the splits: always validation data, never reported test items."""
    v = result.validation
    ppl = (
        f"dense validation ppl {result.dense_ppl:.3f} ({v['num_tokens']:,} held-out tokens of "
        f"{v['dataset'] or 'the calibration text'})"
    )
    zs = result.zeroshot_validation
    if result.rank_by not in ZEROSHOT_RANKINGS or zs is None:
        return f"{ppl}; ranked by validation perplexity; best split {result.best_candidate.label}"
    limit = "all items" if zs["limit"] is None else f"first {zs['limit']} items each"
    dense = "n/a" if result.dense_zeroshot is None else f"{result.dense_zeroshot:.4f}"
    lp = result.dense_zeroshot_logprob
    dense += "" if lp is None else f", right-choice log-probability {lp:.3f}"
    what = (
        f"accuracy ({zs['score']})"
        if result.rank_by == "zeroshot"
        else "the mean log-probability of the right choice"
    )
    return (
        f"{ppl}; dense validation zero-shot {dense}\nranked by zero-shot {what} on the "
        f"VALIDATION split of {','.join(zs['tasks'])} ({limit}), never test items; best "
        f"split {result.best_candidate.label}"
    )


def format_search_table(result: SearchResult) -> str:
    """Text table of the candidates; the best is marked with ``*``."""
    zs = result.rank_by in ZEROSHOT_RANKINGS
    header = ["split a:m", "attention share", "removed", "attn removed", "MLP removed", "val ppl"]
    rows = [header + (["val zero-shot", "val logprob"] if zs else []) + [""]]
    for i, c in enumerate(result.candidates):
        if c.ppl is None:
            cells = [c.label, f"{c.attention_share:.2f}", "-", "-", "-", "infeasible"]
            rows.append(cells + (["-", "-"] if zs else []) + [""])
            continue
        cells = [
            c.label,
            f"{c.attention_share:.2f}",
            f"{100 * (c.achieved_ratio or 0):.2f}%",
            f"{100 * (c.attention_ratio or 0):.1f}%",
            f"{100 * (c.mlp_ratio or 0):.1f}%",
            f"{c.ppl:.3f}",
        ]
        if zs:
            cells.append("n/a" if c.zeroshot is None else f"{c.zeroshot:.4f}")
            lp = c.zeroshot_logprob
            cells.append("n/a" if lp is None else f"{lp:.3f}")
        rows.append(cells + ["*" if i == result.best else ""])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append(_ranking_line(result))
    return "\n".join(lines)


def _plotted(
    result: SearchResult,
) -> tuple[Callable[[Candidate], float | None], float | None, str]:
    """What the plot shows for the ranking: per-candidate value, the dense line, the label."""
    if result.rank_by == "logprob":
        return (
            lambda c: c.zeroshot_logprob,
            result.dense_zeroshot_logprob,
            "validation right-choice log-probability",
        )
    if result.rank_by == "zeroshot":
        return (
            lambda c: c.zeroshot,
            result.dense_zeroshot,
            "validation zero-shot score (acc_norm, else acc)",
        )
    return lambda c: c.ppl, result.dense_ppl, "validation perplexity"


def plot_search(path: str | Path, result: SearchResult, title: str = "") -> Path:
    """The ranking metric (validation perplexity, zero-shot score or log-probability)
    against the attention share of the removed parameters."""
    path = Path(path)
    value, dense, ylabel = _plotted(result)
    points: list[tuple[float, float, str]] = []
    for c in result.candidates:
        y = value(c)
        if y is not None:
            points.append((c.attention_share, y, c.label))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([x for x, _, _ in points], [y for _, y, _ in points], "o-", label="pruned")
    for x, y, label in points:
        ax.annotate(
            label, (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8
        )
    best = result.best_candidate
    ax.plot(
        [best.attention_share], [value(best) or math.nan], "r*", ms=14, label=f"best {best.label}"
    )
    if dense is not None:
        ax.axhline(dense, color="tab:gray", ls="--", lw=0.8, label="dense")
    ax.set_xlabel("attention share of the removed parameters  a / (a + m)")
    ax.set_ylabel(ylabel)
    ax.set_title(title or f"split search at {100 * result.pruning_ratio:.0f}% pruning")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    _save_atomic(fig, path)
    return path


__all__ = ["format_search_table", "plot_search"]
