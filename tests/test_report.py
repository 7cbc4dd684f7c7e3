"""report.html: valid, self-contained HTML with the experiment's numbers."""

import base64
import json
import re
from html.parser import HTMLParser

import pytest

from gqa_prune.allocation import Allocation
from gqa_prune.errors import GQAPruneError
from gqa_prune.reporting.plots import plot_pruning_strategy
from gqa_prune.reporting.report import write_report

VOID = {"meta", "img", "br", "hr", "link", "input", "col", "source", "wbr"}


class Page(HTMLParser):
    """Checks that every non-void tag is closed in order; collects the rows of each table."""

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.tables, self.images = [], [], {}, []
        self.tags = set()
        self._table, self._cell = None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag not in VOID:
            self.stack.append(tag)
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id", f"t{len(self.tables)}"), [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()
        if tag in ("td", "th") and self._cell is not None:
            self._table[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse(path):
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    assert not page.errors and not page.stack, (page.errors, page.stack)
    assert {"html", "head", "body", "main", "title"} <= page.tags
    return page


ALLOCATION = {
    "layers": [
        dict(
            layer=0,
            kv_heads_before=2,
            kv_heads_after=1,
            channels_before=96,
            channels_after=60,
            attention_rate=0.5,
            mlp_rate=0.375,
            rate=0.4375,
        ),
        dict(
            layer=1,
            kv_heads_before=2,
            kv_heads_after=2,
            channels_before=96,
            channels_after=90,
            attention_rate=0.0,
            mlp_rate=0.0625,
            rate=0.02,
        ),
    ],
    "params_removed": 9000,
    "total_params": 60000,
    "achieved_ratio": 0.15,
    "target_ratio": 0.15,
}


def summary():
    return {
        "base_model": "tiny <model>",
        "params_before": 60000,
        "params_after": 51000,
        "params_removed": 9000,
        "target_ratio": 0.15,
        "actual_ratio_total": 0.15,
        "actual_ratio_attention_mlp": 0.2,
        "attention_ratio": 0.25,
        "mlp_ratio": 0.22,
        "gqa_ratio": 4,
        "gqa_ratio_kept_in_every_layer": True,
        "layers": [
            {"layer": 0, "q_heads": 4, "kv_heads": 1, "mlp_size": 60},
            {"layer": 1, "q_heads": 8, "kv_heads": 2, "mlp_size": 90},
        ],
        "perplexity": {
            "before": {
                "ppl": 12.5,
                "nll_sum": 1.0,
                "num_tokens": 100,
                "num_windows": 1,
                "seq_len": 32,
                "dataset": "wikitext2",
            },
            "after": {
                "ppl": 17.25,
                "nll_sum": 1.0,
                "num_tokens": 100,
                "num_windows": 1,
                "seq_len": 32,
                "dataset": "wikitext2",
            },
        },
        "zeroshot": {
            stage: {
                "tasks": {
                    "piqa": {
                        "acc": acc,
                        "acc_norm": acc + 0.01,
                        "acc_stderr": None,
                        "acc_norm_stderr": None,
                        "num_samples": 10,
                    }
                },
                "mean_acc": acc,
                "mean_acc_norm": acc + 0.01,
                "mean_score": acc + 0.01,
                "split": "test",
                "sources": {"piqa": "local /data/zeroshot/piqa/validation.jsonl"},
                "num_fewshot": 0,
                "limit": None,
                "lm_eval_version": "0.4.13",
                "requested": ["piqa"],
            }
            for stage, acc in (("before", 0.7), ("after", 0.6), ("after_finetune", 0.65))
        },
        "efficiency": {
            label: {
                "label": label,
                "params": p,
                "size_bytes": 4 * p,
                "size_source": "estimate",
                "device": "cpu",
                "dtype": "float32",
                "batch_size": 1,
                "prompt_len": 16,
                "new_tokens": 4,
                "repeats": 1,
                "prefill_tokens_per_s": 1000.0 * k,
                "decode_tokens_per_s": 50.0 * k,
                "peak_memory_bytes": 2**30,
                "memory_kind": "cpu_peak_rss",
            }
            for label, p, k in (("dense", 60000, 1), ("pruned", 51000, 2))
        },
        "layer_importance": {"method": "removal", "scores": [0.5, 2.25]},
        "allocation": ALLOCATION,
        "timings_s": {"prune": 1.5},
        "versions": {"python": "3.11"},
    }


def test_report_from_an_experiment_folder(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps(summary()))
    settings = "pruning_ratio: 0.15\nbase_model: <script>x</script>\n"
    (tmp_path / "description.txt").write_text(settings)
    plot_pruning_strategy(
        tmp_path / "pruning_strategy.png", Allocation.from_dict(ALLOCATION), [0.5, 2.25]
    )
    path = write_report(tmp_path)
    assert path == tmp_path / "report.html"
    page = parse(path)
    text = path.read_text()
    assert "<script>" not in text and "&lt;script&gt;" in text and "tiny &lt;model&gt;" in text
    # embedded images: the zero-shot bars, the strategy plot (as saved), the importance plot
    assert len(page.images) == 3
    assert all(s.startswith("data:image/png;base64,") for s in page.images)
    pngs = [base64.b64decode(s.split(",", 1)[1]) for s in page.images]
    assert pngs[1] == (tmp_path / "pruning_strategy.png").read_bytes()
    assert all(p[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert page.tables["layers"] == [
        [
            "layer",
            "Q heads",
            "KV heads",
            "MLP size",
            "attention removed",
            "MLP removed",
            "layer removed",
            "importance",
        ],
        ["0", "8 \u2192 4", "2 \u2192 1", "96 \u2192 60", "50.00%", "37.50%", "43.75%", "0.5"],
        ["1", "8", "2", "96 \u2192 90", "0.00%", "6.25%", "2.00%", "2.25"],
    ]
    assert page.tables["perplexity"][1][:2] == ["before", "12.500"]
    assert page.tables["perplexity"][2][:2] == ["after", "17.250"]
    assert page.tables["zeroshot"][0] == [
        "task",
        "before acc",
        "before acc_norm",
        "after acc",
        "after acc_norm",
        "after_finetune acc",
        "after_finetune acc_norm",
        "after drop acc / acc_norm (pts)",
        "after_finetune drop acc / acc_norm (pts)",
    ]
    zs = page.tables["zeroshot"]
    assert zs[1] == ["piqa", "0.7000", "0.7100", "0.6000", "0.6100", "0.6500", "0.6600",
                     "+10.0 / +10.0", "+5.0 / +5.0"]  # fmt: skip
    assert zs[-1][0].startswith("mean (acc_norm") and zs[-1][-2:] == ["+10.0", "+5.0"]
    assert "test split" in text and "limit None" in text
    eff = {row[0]: row[1:] for row in page.tables["efficiency"]}
    assert eff["decode tokens/s"] == ["50.0", "100.0", "2.000x"]
    assert eff["parameters"][:2] == ["60,000", "51,000"]
    assert ["pruning_ratio", "0.15"] in page.tables["settings"]


def test_report_needs_a_summary(tmp_path):
    with pytest.raises(GQAPruneError, match="summary.json"):
        write_report(tmp_path)
    assert not (tmp_path / "report.html").exists()


def test_minimal_summary_without_optional_sections(tmp_path):
    s = summary()
    for key in ("zeroshot", "efficiency", "perplexity", "layer_importance"):
        del s[key]
    (tmp_path / "summary.json").write_text(json.dumps(s))
    page = parse(write_report(tmp_path))
    assert "zeroshot" not in page.tables and "efficiency" not in page.tables
    assert page.images == []
    assert [row[-1] for row in page.tables["layers"][1:]] == ["n/a", "n/a"]
    assert re.search(r"<h2>Per-layer structure</h2>", (tmp_path / "report.html").read_text())


def test_a_full_run_writes_the_report(tiny_run, monkeypatch):
    """--eval_tasks (a local task) + --measure_speed + --save_model: every section is there."""
    import datasets
    from test_zeroshot import ITEMS, write_task

    from gqa_prune.cli import main

    from conftest import tiny_args

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    tasks = tiny_run["logs"].parent / "tasks"
    tasks.mkdir()
    write_task(tasks, "tiny_mc", ITEMS, [0] * len(ITEMS))
    rc = main(
        tiny_args(
            tiny_run,
            "--prune_mlp",
            "--pruning_ratio",
            "0.3",
            "--save_model",
            "--test_after_prune",
            "--save_ckpt_log_name",
            "r",
            "--eval_tasks",
            "tiny_mc",
            "--eval_include_path",
            str(tasks),
            "--eval_limit",
            "4",
            "--measure_speed",
            "--compensation",
            "none",
        )
    )
    assert rc == 0
    exp = tiny_run["logs"] / "r"
    summary = json.loads((exp / "summary.json").read_text())
    assert set(summary["zeroshot"]) == {"before", "after"}
    assert summary["zeroshot"]["before"]["tasks"]["tiny_mc"]["num_samples"] == 4
    eff = summary["efficiency"]
    assert eff["pruned"]["params"] == summary["params_after"] < eff["dense"]["params"]
    assert eff["pruned"]["size_source"] == "disk" and eff["dense"]["size_source"] == "disk"
    page = parse(exp / "report.html")
    assert len(page.images) >= 2  # strategy plot + importance plot
    plan = json.loads((exp / "pruning_plan.json").read_text())
    r = plan["queries_per_kv"]
    rows = page.tables["layers"][1:]
    assert len(rows) == len(plan["layers"])
    for row, lp in zip(rows, plan["layers"]):
        kv, mlp = len(lp["keep_kv_groups"]), len(lp["keep_mlp_channels"])
        assert row[2].split(" \u2192 ")[-1] == str(kv)
        assert row[1].split(" \u2192 ")[-1] == str(kv * r)
        assert row[3].split(" \u2192 ")[-1] == str(mlp)
    zs = page.tables["zeroshot"]
    assert zs[1][0] == "tiny_mc" and zs[-2][0] == "mean"
    assert summary["zeroshot_drop"]["after"]["tasks"]["tiny_mc"]["acc"] == pytest.approx(
        summary["zeroshot"]["before"]["tasks"]["tiny_mc"]["acc"]
        - summary["zeroshot"]["after"]["tasks"]["tiny_mc"]["acc"]
    )
    assert len(page.images) >= 3  # + the zero-shot bars
    assert zs[1][1] == f"{summary['zeroshot']['before']['tasks']['tiny_mc']['acc']:.4f}"
    assert "prefill tokens/s" in {row[0] for row in page.tables["efficiency"]}


def test_zeroshot_bars_are_the_summary_scores():
    from gqa_prune.reporting.zeroshot_plots import bar_values

    zs = summary()["zeroshot"]
    zs["before"]["tasks"]["boolq"] = dict(zs["before"]["tasks"]["piqa"], acc=0.5, acc_norm=None)
    zs["before"]["requested"] = ["piqa", "boolq"]
    labels, values = bar_values(zs)
    assert labels == ["piqa", "boolq", "mean"]
    assert values["dense"] == [0.71, 0.5, 0.71]  # acc_norm, else acc; then mean_score
    assert values["pruned"] == [0.61, None, 0.61] and list(values) == [
        "dense",
        "pruned",
        "recovered",
    ]
