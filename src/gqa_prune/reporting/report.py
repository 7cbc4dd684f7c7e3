"""``report.html``: one self-contained page per experiment, built from its folder.

Read: ``summary.json`` (required; the machine-readable twin of the page),
``description.txt`` (settings) and the PNG figures (``pruning_strategy.png``,
``finetune_loss.png``, any other ``*.png``). The figures are embedded as base64 data URIs
and the layer importance is drawn into the page too, so the file opens in a browser
without a server and survives being copied alone. Every text from the folder is escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from gqa_prune.errors import GQAPruneError
from gqa_prune.io_utils import write_text_atomic

REPORT_FILE = "report.html"
# known figures first, in this order; other PNGs of the folder follow under their file name
FIGURES = {
    "pruning_strategy.png": "Pruning strategy: layer importance and per-layer rates",
    "finetune_loss.png": "Recovery fine-tuning loss",
    "search_distributions.png": "Attention:MLP split search (ranked on validation data)",
}
STYLE = """
body{font-family:system-ui,sans-serif;margin:0;background:#fafafa;color:#222}
main{max-width:1100px;margin:auto;padding:1rem 2rem;background:#fff}
h1{font-size:1.5rem}h2{font-size:1.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.5rem 0 1rem}
th,td{border:1px solid #ddd;padding:.25rem .6rem;text-align:right}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee}figure{margin:1rem 0}
figcaption{color:#555;font-size:.9rem}.muted{color:#777;font-size:.9rem}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], table_id: str = "") -> str:
    id_attr = f' id="{_e(table_id)}"' if table_id else ""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table{id_attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _section(title: str, body: str, section_id: str) -> str:
    return f'<section id="{_e(section_id)}"><h2>{_e(title)}</h2>{body}</section>'


def _img(png: bytes, alt: str, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}">'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _num(x: float | None, fmt: str = ".4f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _arrow(before: Any, after: Any) -> str:
    return f"{before}" if before == after else f"{before} \u2192 {after}"


def read_settings(path: Path) -> list[tuple[str, str]]:
    """``key: value`` lines of ``description.txt``; missing file -> no settings."""
    if not path.is_file():
        return []
    pairs = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            pairs.append((key, value))
    return pairs


def layer_rows(summary: dict[str, Any]) -> list[list[str]]:
    """Per layer: Q / KV heads and MLP size (before -> after), removed rates, importance."""
    r = int(summary.get("gqa_ratio", 1))
    allocation = summary.get("allocation", {}).get("layers", [])
    after = {row["layer"]: row for row in summary.get("layers", [])}
    scores = summary.get("layer_importance", {}).get("scores") or []
    rows = []
    for la in allocation:
        i = la["layer"]
        kv_after = after.get(i, {}).get("kv_heads", la["kv_heads_after"])
        mlp_after = after.get(i, {}).get("mlp_size", la["channels_after"])
        rows.append(
            [
                str(i),
                _arrow(la["kv_heads_before"] * r, kv_after * r),
                _arrow(la["kv_heads_before"], kv_after),
                _arrow(la["channels_before"], mlp_after),
                _pct(la["attention_rate"]),
                _pct(la["mlp_rate"]),
                _pct(la["rate"]),
                _num(scores[i], ".4g") if i < len(scores) else "n/a",
            ]
        )
    return rows


def _importance_png(scores: Sequence[float], method: str) -> bytes:
    from gqa_prune.reporting.plots import plt

    fig, ax = plt.subplots(figsize=(8, 3))
    ax.bar(range(len(scores)), list(scores), color="tab:gray")
    ax.set_xlabel("layer")
    ax.set_ylabel(f"importance ({method})")
    ax.grid(alpha=0.3, axis="y")
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buf.getvalue()


def _removed(s: dict[str, Any]) -> list[tuple[str, str]]:
    """Removed share of all and of the non-embedding parameters; the target on its basis."""
    basis = s.get("pruning_ratio_basis", "total")
    rows = []
    for key, label in (("total", "removed (total)"), ("non_embedding", "removed (non-embedding)")):
        if s.get(f"actual_ratio_{key}") is not None:
            target = f" (target {_pct(s['target_ratio'])})" if key == basis else ""
            rows.append((label, f"{_pct(s[f'actual_ratio_{key}'])}{target}"))
    return rows


def _overview(s: dict[str, Any]) -> str:
    rows = [
        ("base model", s.get("base_model", "")),
        ("parameters before", f"{s['params_before']:,}"),
        ("parameters after", f"{s['params_after']:,}"),
        *_removed(s),
        ("removed (attention+MLP)", _pct(s.get("actual_ratio_attention_mlp"))),
        ("KV heads removed", _pct(s.get("attention_ratio"))),
        ("MLP channels removed", _pct(s.get("mlp_ratio"))),
        (
            "GQA ratio kept in every layer",
            f"{s.get('gqa_ratio_kept_in_every_layer')} ({s.get('gqa_ratio')}:1)",
        ),
    ]
    return _table(["", "value"], rows, "overview")


def _perplexity(ppl: dict[str, Any]) -> str:
    rows = [
        [
            stage,
            _num(r["ppl"], ".3f"),
            r.get("dataset", ""),
            r.get("seq_len", ""),
            f"{r.get('num_tokens', 0):,}",
        ]
        for stage, r in ppl.items()
    ]
    return _table(["stage", "perplexity", "dataset", "seq_len", "tokens"], rows, "perplexity")


def _drop(before: float | None, after: float | None) -> str:
    return "n/a" if before is None or after is None else f"{100 * (before - after):+.1f}"


def _zeroshot(zs: dict[str, Any]) -> str:
    """Per task and stage acc / acc_norm, the drop from the first stage (dense) in points,
    the means and a bar chart."""
    from gqa_prune.reporting.zeroshot_plots import zeroshot_bars_png

    stages = list(zs)
    names: list[str] = []
    for r in zs.values():
        names += [n for n in r["tasks"] if n not in names]
    header = ["task"] + [f"{s} {m}" for s in stages for m in ("acc", "acc_norm")]
    header += [f"{s} drop acc / acc_norm (pts)" for s in stages[1:]]

    def pair(stage: str, n: str) -> tuple[float | None, float | None]:
        if n == "mean":
            return zs[stage].get("mean_acc"), zs[stage].get("mean_acc_norm")
        if n == "score":  # the headline: acc_norm where a task has it, else acc
            return None, zs[stage].get("mean_score")
        t = zs[stage]["tasks"].get(n, {})
        return t.get("acc"), t.get("acc_norm")

    rows = []
    for n in [*names, "mean", "score"]:
        row = ["mean (acc_norm, else acc)" if n == "score" else n]
        for s in stages:
            a, b = pair(s, n)
            row += ["" if n == "score" else _num(a), _num(b)]
        a0, b0 = pair(stages[0], n)
        for s in stages[1:]:
            a, b = pair(s, n)
            row.append(_drop(b0, b) if n == "score" else f"{_drop(a0, a)} / {_drop(b0, b)}")
        rows.append(row)
    first = zs[stages[0]]
    sources = sorted({str(v).split(" ", 1)[0] for v in first.get("sources", {}).values()})
    note = (
        f'<p class="muted">lm-evaluation-harness {_e(first.get("lm_eval_version", "?"))}, '
        f"{_e(first.get('num_fewshot', 0))}-shot, {_e(first.get('split', 'test'))} split, "
        f"limit {_e(first.get('limit'))} (the first items of each task), data: "
        f"{_e(', '.join(sources) or 'n/a')}; drop = first stage minus this stage, in "
        "accuracy points (positive = lost)</p>"
    )
    chart = _img(
        zeroshot_bars_png(zs),
        "zero-shot accuracy per task",
        "Zero-shot accuracy per task (acc_norm, else acc): " + " vs ".join(stages),
    )
    return _table(header, rows, "zeroshot") + note + chart


def _efficiency(eff: dict[str, Any]) -> str:
    labels = [k for k in ("dense", "pruned") if k in eff]
    lines = [
        ("parameters", lambda r: f"{r['params']:,}"),
        ("size", lambda r: f"{r['size_bytes'] / 2**20:,.1f} MiB ({r['size_source']})"),
        ("prefill tokens/s", lambda r: f"{r['prefill_tokens_per_s']:,.1f}"),
        ("decode tokens/s", lambda r: f"{r['decode_tokens_per_s']:,.1f}"),
        (
            "peak memory",
            lambda r: f"{r['peak_memory_bytes'] / 2**20:,.1f} MiB ({r['memory_kind']})",
        ),
    ]
    fields = (
        "params",
        "size_bytes",
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
        "peak_memory_bytes",
    )
    both = len(labels) == 2
    header = ["", *labels] + (["pruned / dense"] if both else [])
    rows = []
    for (name, cell), key in zip(lines, fields, strict=True):
        row = [name, *(cell(eff[k]) for k in labels)]
        if both:
            dense = eff["dense"][key]
            row.append(f"{eff['pruned'][key] / dense:.3f}x" if dense else "n/a")
        rows.append(row)
    r0 = eff[labels[0]] if labels else {}
    note = (
        f'<p class="muted">{_e(r0.get("device", ""))} {_e(r0.get("dtype", ""))}, batch '
        f"{_e(r0.get('batch_size', ''))}, prompt {_e(r0.get('prompt_len', ''))} tokens, "
        f"{_e(r0.get('new_tokens', ''))} new tokens, median of {_e(r0.get('repeats', ''))}</p>"
    )
    return _table(header, rows, "efficiency") + note


def _finetune(ft: dict[str, Any]) -> str:
    keys = ("method", "steps", "tokens", "wall_time_s", "final_loss", "message")
    return _table(["", "value"], [(k, ft.get(k)) for k in keys if k in ft], "finetune")


def render_report(exp_dir: str | Path) -> str:
    """The HTML text of an experiment folder's report (see the module docstring).

    Raises:
        GQAPruneError: the folder has no readable ``summary.json``.
    """
    root = Path(exp_dir)
    try:
        s = json.loads((root / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GQAPruneError(
            f"cannot build the report: {root / 'summary.json'} is missing or not JSON ({exc})"
        ) from exc
    title = f"gqa-prune report: {root.name}"
    parts = [
        f"<h1>{_e(title)}</h1>",
        f'<p class="muted">generated {_e(time.strftime("%Y-%m-%d %H:%M:%S"))} from '
        f"{_e(root / 'summary.json')}</p>",
    ]
    parts.append(_section("Overview", _overview(s), "summary"))
    if s.get("perplexity"):
        parts.append(_section("Perplexity", _perplexity(s["perplexity"]), "ppl"))
    if s.get("zeroshot"):
        parts.append(_section("Zero-shot accuracy", _zeroshot(s["zeroshot"]), "zs"))
    if s.get("efficiency"):
        parts.append(_section("Efficiency", _efficiency(s["efficiency"]), "eff"))
    if s.get("finetune"):
        parts.append(_section("Recovery fine-tuning", _finetune(s["finetune"]), "ft"))
    header = [
        "layer",
        "Q heads",
        "KV heads",
        "MLP size",
        "attention removed",
        "MLP removed",
        "layer removed",
        "importance",
    ]
    parts.append(
        _section("Per-layer structure", _table(header, layer_rows(s), "layers"), "per-layer")
    )
    figures = []
    pngs = sorted(root.glob("*.png"))
    known = [root / n for n in FIGURES if (root / n).is_file()]
    for path in known + [p for p in pngs if p not in known]:
        figures.append(_img(path.read_bytes(), path.stem, FIGURES.get(path.name, path.name)))
    imp = s.get("layer_importance", {})
    if imp.get("scores"):
        method = str(imp.get("method", ""))
        figures.insert(
            min(1, len(figures)),
            _img(
                _importance_png(imp["scores"], method),
                "layer importance",
                f"Layer importance ({method}; higher = more important)",
            ),
        )
    if figures:
        parts.append(_section("Figures", "".join(figures), "figures"))
    if s.get("timings_s"):
        rows = [(k, f"{v:.2f}") for k, v in s["timings_s"].items()]
        parts.append(_section("Timings (s)", _table(["step", "seconds"], rows, "timings"), "time"))
    settings = read_settings(root / "description.txt")
    if settings:
        parts.append(
            _section("Settings", _table(["setting", "value"], settings, "settings"), "settings")
        )
    versions = s.get("versions", {})
    if versions:
        parts.append(
            f'<p class="muted">{_e(", ".join(f"{k} {v}" for k, v in versions.items()))}</p>'
        )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_e(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main>\n"
        + "\n".join(parts)
        + "\n</main>\n</body>\n</html>\n"
    )


def write_report(exp_dir: str | Path) -> Path:
    """Write ``<exp_dir>/report.html`` atomically; returns its path."""
    path = Path(exp_dir) / REPORT_FILE
    write_text_atomic(path, render_report(exp_dir))
    return path


__all__ = ["REPORT_FILE", "layer_rows", "read_settings", "render_report", "write_report"]
