"""Zero-shot through lm-evaluation-harness, offline, on a local multiple-choice task.

The expected numbers are computed by hand: each choice's log-likelihood from one forward
pass of the model, then argmax (acc) and argmax of ll / len(choice) (acc_norm).
"""

import json
import sys

import pytest
import torch
from cli_helpers import assert_one_error_line

from gqa_prune.errors import GQAPruneError
from gqa_prune.evaluation.paired import paired_difference
from gqa_prune.evaluation.zeroshot import TaskScore, evaluate_zeroshot, parse_tasks, task_manager

from conftest import char_tokenizer, tiny_model

ITEMS = [
    ("The sky is", ["blue", "green grass", "red"]),
    ("Two plus two is", ["four", "five", "a fish"]),
    ("The cat sat on the", ["mat", "moon", "big idea"]),
    ("Water is", ["wet", "dry", "loud"]),
    ("Pruning removes", ["heads", "channels", "nothing at all"]),
    ("A fox is", ["quick", "lazy", "a dog"]),
]

TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@torch.no_grad()
def hand_loglikelihoods(model, tok, context, choices):
    """sum_t log p(choice[t] | context, choice[<t]); the harness puts ' ' between them."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    out = []
    for choice in choices:
        cont = tok(" " + choice, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx + cont])
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        out.append(sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)))
    return out


def write_task(folder, name, items, labels):
    data = folder / f"{name}.jsonl"
    rows = [
        json.dumps({"question": q, "choices": c, "label": lab})
        for (q, c), lab in zip(items, labels)
    ]
    data.write_text("\n".join(rows) + "\n")
    (folder / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data))


@pytest.fixture
def offline(monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def test_local_task_matches_a_hand_computation(tmp_path, offline):
    model, tok = tiny_model("llama4", seed=3), char_tokenizer()
    lls = [hand_loglikelihoods(model, tok, q, c) for q, c in ITEMS]
    argmax = [max(range(len(ll)), key=ll.__getitem__) for ll in lls]
    argmin = [min(range(len(ll)), key=ll.__getitem__) for ll in lls]
    # gold = the model's favourite on even items, its least favourite on odd ones: acc = 1/2
    mixed = [a if i % 2 == 0 else b for i, (a, b) in enumerate(zip(argmax, argmin))]
    write_task(tmp_path, "tiny_mixed", ITEMS, mixed)
    write_task(tmp_path, "tiny_easy", ITEMS, argmax)  # gold = favourite: acc = 1
    norm_pred = [
        max(range(len(ll)), key=lambda i, ll=ll, c=c: ll[i] / len(c[i]))
        for ll, (_, c) in zip(lls, ITEMS)
    ]
    acc_norm = {
        name: sum(p == g for p, g in zip(norm_pred, gold)) / len(ITEMS)
        for name, gold in (("tiny_mixed", mixed), ("tiny_easy", argmax))
    }

    training = model.train()  # the evaluation must leave the mode as it found it
    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    result = evaluate_zeroshot(
        training, tok, "tiny_mixed,tiny_easy", batch_size=4, include_path=tmp_path
    )
    assert torch.equal(torch.rand(3), expected_next)  # global RNG state restored
    assert model.training

    assert result.tasks["tiny_mixed"].acc == pytest.approx(0.5)
    assert result.tasks["tiny_easy"].acc == pytest.approx(1.0)
    for name in ("tiny_mixed", "tiny_easy"):
        assert result.tasks[name].acc_norm == pytest.approx(acc_norm[name])
        assert result.tasks[name].num_samples == len(ITEMS)
    assert result.mean_acc == pytest.approx(0.75)
    assert result.mean_acc_norm == pytest.approx(sum(acc_norm.values()) / 2)
    assert result.requested == ("tiny_mixed", "tiny_easy")
    assert type(result).from_dict(json.loads(json.dumps(result.to_dict()))) == result


@pytest.mark.parametrize(
    "text, words", [("boolq,,piqa", "empty task name"), ("piqa,piqa", "more than once")]
)
def test_malformed_task_lists(text, words):
    with pytest.raises(GQAPruneError, match=words):
        parse_tasks(text)


def test_unknown_task_suggests_close_names(tmp_path, monkeypatch):
    import lm_eval.tasks

    class FakeManager:
        def __init__(self, include_path=None, include_defaults=True):
            self.all_tasks = ["tiny_mc", "hellaswag"]

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", FakeManager)
    with pytest.raises(GQAPruneError, match="did you mean tiny_mc"):
        task_manager(["tiny_mx"], tmp_path)
    with pytest.raises(GQAPruneError, match="not a folder"):
        task_manager(["tiny_mc"], tmp_path / "missing")


def test_missing_harness_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(GQAPruneError, match=r"pip install 'gqa-prune\[eval\]'"):
        evaluate_zeroshot(tiny_model(), char_tokenizer(), ["piqa"])


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--eval_tasks", "piqa,,boolq"], "empty task name"),
        (["--eval_tasks", "piqa", "--eval_limit", "0"], "--eval_limit must be positive"),
        (["--eval_limit", "5"], "need --eval_tasks"),
        (["--eval_tasks", "piqa", "--eval_include_path", "/nonexistent/tasks"], "not a folder"),
        (["--eval_tasks", "piqa", "<no lm_eval>"], "pip install 'gqa-prune[eval]'"),
    ],
)
def test_bad_zeroshot_flags_through_the_cli(tiny_run, capsys, monkeypatch, extra, words):
    from gqa_prune.cli import main

    from conftest import tiny_args

    if "<no lm_eval>" in extra:
        extra = extra[:-1]
        monkeypatch.setitem(sys.modules, "lm_eval", None)
    rc = main(tiny_args(tiny_run, "--prune_mlp", "--save_ckpt_log_name", "z", *extra))
    assert_one_error_line(capsys, rc, words)
    assert not (tiny_run["logs"] / "z").exists()


# ---------------------------------------------------------------- the standard suite, local
from pathlib import Path  # noqa: E402

from gqa_prune.evaluation.tasks import (  # noqa: E402
    CHOICE_LOGPROB_METRIC,
    DATA_KEYS,
    SPLIT_FILES,
    STANDARD_TASKS,
    SUITE,
    VALIDATION_TASKS,
    local_task_config,
)
from gqa_prune.evaluation.zeroshot import (  # noqa: E402
    ZeroShotResult,
    format_zeroshot_table,
    prepare_tasks,
    zeroshot_drop,
)

# the stock task definitions of the installed lm-eval (tasks/<path>)
STOCK_YAML = {
    "piqa": "piqa/piqa.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "winogrande": "winogrande/default.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
}


def _arc(q, texts, labels, key):
    return {
        "id": q[:8],
        "question": q,
        "choices": {"text": texts, "label": labels},
        "answerKey": key,
    }


# rows written for these tests with each data set's column names, covering the odd cases:
# ARC with 3 or 5 choices and numeric labels, an OpenBookQA key with a stray space, a
# WinoGrande blank at the end of a clause
ROWS = {
    "piqa": [
        {
            "goal": "How do you cool soup fast?",
            "sol1": "Stir it in a cold bath.",
            "sol2": "Put it in the oven.",
            "label": 0,
        },
        {
            "goal": "Keep bread soft",
            "sol1": "Leave it open.",
            "sol2": "Seal it in a bag.",
            "label": 1,
        },
        {
            "goal": "Dry wet shoes",
            "sol1": "Stuff them with paper.",
            "sol2": "Fill with water.",
            "label": 0,
        },
    ],
    "arc_easy": [
        _arc(
            "Which is a gas at room temperature?",
            ["iron", "oxygen", "salt", "wood"],
            ["A", "B", "C", "D"],
            "B",
        ),
        _arc(
            "What do plants need to make food?", ["sunlight", "sand", "noise"], ["A", "B", "C"], "A"
        ),
        _arc(
            "Which tool measures mass?",
            ["ruler", "clock", "balance", "thermometer", "map"],
            ["1", "2", "3", "4", "5"],
            "3",
        ),
    ],
    "boolq": [
        {
            "question": "is the moon a planet",
            "passage": "Moon -- The Moon is a natural satellite.",
            "idx": 0,
            "label": 0,
        },
        {
            "question": "do penguins live in antarctica",
            "passage": "Penguin -- Many penguins live in Antarctica.",
            "idx": 1,
            "label": 1,
        },
    ],
    "winogrande": [
        {
            "sentence": "The cup fell off the shelf because _ was too close to the edge.",
            "option1": "the cup",
            "option2": "the shelf",
            "answer": "1",
        },
        {
            "sentence": "Anna gave Beth her coat since _ was cold.",
            "option1": "Anna",
            "option2": "Beth",
            "answer": "2",
        },
    ],
    "openbookqa": [
        {
            "id": "1-1",
            "question_stem": "A magnet will stick to",
            "choices": {
                "text": ["a nail", "a cork", "glass", "paper"],
                "label": ["A", "B", "C", "D"],
            },
            "answerKey": " A",
        },
        {
            "id": "1-2",
            "question_stem": "Ice melting is an example of",
            "choices": {
                "text": ["a change of state", "rusting", "growth", "burning"],
                "label": ["A", "B", "C", "D"],
            },
            "answerKey": "A",
        },
    ],
}
ROWS["arc_challenge"] = ROWS["arc_easy"][::-1]


def write_rows(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_suite(folder, rows=ROWS, splits=("test", "validation")):
    """<folder>/<task>/<file>.jsonl for every task and split (validation rows reversed)."""
    for task, files in SPLIT_FILES.items():
        for split, stem in files.items():
            if split in splits:
                data = rows[task] if split == "test" else rows[task][::-1]
                write_rows(folder / task / f"{stem}.jsonl", data)
    return folder


def stock_config(task, data_file, split_key):
    """lm-eval's own task config (from the installed package), reading ``data_file``."""
    from lm_eval.tasks import _yaml_loader

    path = Path(lm_eval_tasks_dir()) / STOCK_YAML[task]
    config = _yaml_loader.load_yaml(path, resolve_func=True)
    config.update(
        dataset_path="json",
        dataset_name=None,
        dataset_kwargs={"data_files": {split_key: str(data_file)}},
        training_split=None,
        validation_split=split_key if split_key == "validation" else None,
        test_split=split_key if split_key == "test" else None,
        fewshot_split=None,
    )
    config.pop("tag", None)
    return config


def lm_eval_tasks_dir():
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def rendered(config, limit):
    """What the harness asks the model, per item: [(context, continuation), ...], target."""
    from lm_eval.api.task import ConfigurableTask

    task = ConfigurableTask(config=config)
    task.build_all_requests(limit=limit)
    by_doc = {}
    for inst in task.instances:
        by_doc.setdefault(inst.doc_id, []).append(tuple(inst.arguments))
    docs = list(task.eval_docs)[:limit]
    return [(by_doc[i], task.doc_to_target(d), task.doc_to_choice(d)) for i, d in enumerate(docs)]


def _plain(value):
    return value.__name__ if callable(value) else value


def real_folder():
    import os

    root = os.environ.get("GQA_PRUNE_DATA_DIR")
    folder = Path(root) / "zeroshot" if root else None
    return folder if folder is not None and folder.is_dir() else None


@pytest.mark.parametrize("task", STANDARD_TASKS)
def test_local_task_renders_as_the_stock_task(task, tmp_path, offline):
    folder = write_suite(tmp_path / "zs")
    sources = [(folder, 3)]
    if real_folder() is not None:  # and the first items of the real files, where present
        sources.append((real_folder(), 20))
    for source, limit in sources:
        for split, stem in SPLIT_FILES[task].items():
            ours = local_task_config(task, source, split)
            stock = stock_config(task, source / task / f"{stem}.jsonl", stem)
            # everything but the data source is the stock task's; the choice log-prob is added
            keep = [k for k in {*ours, *stock} if k not in (*DATA_KEYS, "metric_list")]
            assert {k: _plain(ours.get(k)) for k in keep} == {k: _plain(stock.get(k)) for k in keep}
            assert ours["metric_list"] == [*stock["metric_list"], CHOICE_LOGPROB_METRIC]
            got, want = rendered(ours, limit), rendered(stock, limit)
            assert len(got) == (min(limit, len(ROWS[task])) if source == folder else limit)
            assert got == want


def test_suite_names_and_splits():
    assert parse_tasks(SUITE) == STANDARD_TASKS
    assert parse_tasks(f"hellaswag,{SUITE}") == ("hellaswag", *STANDARD_TASKS)
    assert (
        parse_tasks(SUITE, "validation")
        == VALIDATION_TASKS
        == (
            "arc_easy",
            "arc_challenge",
            "openbookqa",
        )
    )
    with pytest.raises(GQAPruneError, match="piqa more than once"):
        parse_tasks(f"{SUITE},piqa")
    with pytest.raises(GQAPruneError, match="unknown zero-shot split"):
        parse_tasks("piqa", "train")


def test_missing_file_names_the_task_and_the_path(tmp_path, offline):
    folder = write_suite(tmp_path / "zs")
    (folder / "winogrande" / "validation.jsonl").unlink()
    with pytest.raises(GQAPruneError) as info:
        prepare_tasks(SUITE, zeroshot_data_dir=folder)
    message = str(info.value)
    assert "winogrande" in message and str(folder / "winogrande" / "validation.jsonl") in message
    assert "\n" not in message
    # the validation split: only where a task has validation items of its own
    with pytest.raises(GQAPruneError, match="not hellaswag"):
        prepare_tasks("arc_easy,hellaswag", split="validation", zeroshot_data_dir=folder)
    with pytest.raises(GQAPruneError, match="piqa has no validation items"):
        prepare_tasks("piqa", split="validation", zeroshot_data_dir=folder)
    with pytest.raises(GQAPruneError, match="validation split reads local files only"):
        prepare_tasks("arc_easy", split="validation", zeroshot_data_dir=None, data_dir=tmp_path)


def test_offline_without_local_files_says_where_it_looked(tmp_path, offline, monkeypatch):
    monkeypatch.delenv("GQA_PRUNE_DATA_DIR", raising=False)
    with pytest.raises(GQAPruneError, match=f"piqa: no local files \\({tmp_path}/zeroshot\\)"):
        prepare_tasks("piqa", data_dir=tmp_path)


def test_data_dir_zeroshot_folder_is_used(tmp_path, offline, monkeypatch):
    monkeypatch.delenv("GQA_PRUNE_DATA_DIR", raising=False)
    write_suite(tmp_path / "data" / "zeroshot")
    sel = prepare_tasks("arc_easy,piqa", data_dir=tmp_path / "data")
    assert [type(s) for s in sel.specs] == [dict, dict]
    assert sel.sources["piqa"].endswith(str(Path("zeroshot") / "piqa" / "validation.jsonl"))
    monkeypatch.setenv("GQA_PRUNE_DATA_DIR", str(tmp_path / "data"))
    sel = prepare_tasks("arc_easy", split="validation")
    assert sel.sources["arc_easy"].endswith(str(Path("arc_easy") / "validation.jsonl"))


def piqa_hand_scores(model, tok, rows):
    """acc / acc_norm / right-choice log-prob of lm-eval's piqa prompt, by hand."""
    acc = acc_norm = logprob = 0
    for r in rows:
        choices = [r["sol1"], r["sol2"]]
        ll = hand_loglikelihoods(model, tok, f"Question: {r['goal']}\nAnswer:", choices)
        acc += max(range(2), key=ll.__getitem__) == r["label"]
        # the harness normalises by the choice's length in characters
        acc_norm += max(range(2), key=lambda i: ll[i] / len(choices[i])) == r["label"]
        logprob += float(torch.log_softmax(torch.tensor(ll, dtype=torch.float64), 0)[r["label"]])
    return acc / len(rows), acc_norm / len(rows), logprob / len(rows)


def test_limit_takes_the_first_items_and_matches_a_hand_computation(tmp_path, offline):
    model, tok = tiny_model("llama4", seed=3), char_tokenizer()
    rows = [
        {"goal": f"Step {i}: {g}", "sol1": a, "sol2": b, "label": i % 2}
        for i, (g, a, b) in enumerate(
            [
                ("open a jar", "twist the lid", "shout at it"),
                ("boil water", "heat it", "cool it"),
                ("light a room", "switch a lamp on", "close eyes"),
                ("wake up", "set an alarm", "nap"),
                ("cut paper", "use scissors", "use soup"),
                ("wash hands", "use soap", "use mud"),
                ("sew a button", "use thread", "use glue"),
                ("read at night", "use a light", "guess"),
            ]
        )
    ]
    folder = tmp_path / "zs"
    write_rows(folder / "piqa" / "validation.jsonl", rows)
    result = evaluate_zeroshot(
        model, tok, "piqa", limit=5, zeroshot_data_dir=folder, log_samples=True
    )
    assert result.tasks["piqa"].num_samples == 5
    acc, acc_norm, logprob = piqa_hand_scores(model, tok, rows[:5])
    assert result.tasks["piqa"].acc == pytest.approx(acc)
    assert result.tasks["piqa"].acc_norm == pytest.approx(acc_norm)
    assert result.tasks["piqa"].logprob == pytest.approx(logprob, rel=1e-4)
    assert result.mean_logprob == result.tasks["piqa"].logprob
    assert result.split == "test" and result.sources["piqa"].startswith("local ")
    assert result.mean_score == result.tasks["piqa"].acc_norm
    # the per-item values average to the task's scores, item by item in order
    items = result.items["piqa"]
    assert items["doc_id"] == [0, 1, 2, 3, 4]
    assert sum(items["score"]) / 5 == pytest.approx(acc_norm)
    assert sum(items["logprob"]) / 5 == pytest.approx(logprob, rel=1e-4)
    for i, r in enumerate(rows[:5]):
        assert items["logprob"][i] == pytest.approx(piqa_hand_scores(model, tok, [r])[2], rel=1e-4)
    assert type(result).from_dict(json.loads(json.dumps(result.to_dict()))) == result

    # a paired comparison with another model on the same items
    other = evaluate_zeroshot(
        tiny_model("llama4", seed=8),
        tok,
        "piqa",
        limit=5,
        zeroshot_data_dir=folder,
        log_samples=True,
    )
    per_task, mean = paired_difference(result, other)
    assert per_task["piqa"].diff == pytest.approx(acc_norm - other.tasks["piqa"].acc_norm)
    assert mean.diff == pytest.approx(per_task["piqa"].diff) and mean.n == 5
    _, lp = paired_difference(result, other, metric="logprob")
    assert lp.diff == pytest.approx(result.mean_logprob - other.mean_logprob, rel=1e-6)
    unlogged = evaluate_zeroshot(model, tok, "piqa", limit=3, zeroshot_data_dir=folder)
    assert unlogged.items == {}
    with pytest.raises(GQAPruneError, match="no per-item scores.*log_samples"):
        paired_difference(result, unlogged)


def test_validation_split_reads_only_the_validation_file(tmp_path, offline):
    model, tok = tiny_model("llama4", seed=4), char_tokenizer()
    folder = write_suite(tmp_path / "zs")
    # the test file's items would fail to parse as ARC: reading it would raise
    (folder / "arc_easy" / "test.jsonl").write_text('{"broken": true}\n')
    result = evaluate_zeroshot(model, tok, "arc_easy", split="validation", zeroshot_data_dir=folder)
    assert result.split == "validation"
    assert result.sources["arc_easy"].endswith("validation.jsonl")
    assert result.tasks["arc_easy"].num_samples == len(ROWS["arc_easy"])


def _result(scores, limit=10):
    tasks = {
        n: TaskScore(acc=a, acc_norm=b, acc_stderr=None, acc_norm_stderr=None, num_samples=limit)
        for n, (a, b) in scores.items()
    }
    return ZeroShotResult(
        tasks=tasks,
        mean_acc=sum(a for a, _ in scores.values()) / len(scores),
        mean_acc_norm=None,
        num_fewshot=0,
        limit=limit,
        lm_eval_version="x",
        requested=tuple(scores),
    )


def test_drop_from_dense_and_the_table():
    dense = _result({"piqa": (0.7, 0.75), "boolq": (0.6, None)})
    pruned = _result({"piqa": (0.6, 0.5), "boolq": (0.55, None)})
    drop = zeroshot_drop(dense, pruned)
    assert drop["tasks"]["piqa"] == {"acc": pytest.approx(0.1), "acc_norm": pytest.approx(0.25)}
    assert drop["tasks"]["boolq"]["acc_norm"] is None
    # headline score: acc_norm where the task has it, else acc
    assert dense.mean_score == pytest.approx((0.75 + 0.6) / 2)
    assert drop["mean_score"] == pytest.approx(((0.75 + 0.6) - (0.5 + 0.55)) / 2)
    table = format_zeroshot_table({"before": dense, "after": pruned}).splitlines()
    assert table[1].split() == [
        "piqa",
        "0.7000",
        "/",
        "0.7500",
        "0.6000",
        "/",
        "0.5000",
        "+10.0",
        "/",
        "+25.0",
    ]
    score = next(line for line in table if line.startswith("mean score"))
    assert score.split() == ["mean", "score*", "0.6750", "0.5250", "+15.0"]
    assert ZeroShotResult.from_dict(json.loads(json.dumps(dense.to_dict()))) == dense


def test_missing_file_through_the_cli(tiny_run, capsys, tmp_path):
    from gqa_prune.cli import main

    from conftest import tiny_args

    folder = write_suite(tmp_path / "zs")
    (folder / "boolq" / "validation.jsonl").unlink()
    rc = main(
        tiny_args(
            tiny_run, "--prune_mlp", "--save_ckpt_log_name", "m", "--eval_tasks", SUITE,
            "--zeroshot_data_dir", str(folder),
        )
    )  # fmt: skip
    assert_one_error_line(capsys, rc, str(folder / "boolq" / "validation.jsonl"))
    assert not (tiny_run["logs"] / "m").exists()


def test_suite_from_the_data_dir_through_the_cli(tiny_run, capsys, offline):
    """--eval_tasks zeroshot6 with <data_dir>/zeroshot: both stages, drop, table, sources."""
    from gqa_prune.cli import main

    from conftest import tiny_args

    write_suite(Path(tiny_run["data"]) / "zeroshot")
    args = ["--prune_mlp", "--pruning_ratio", "0.1", "--save_ckpt_log_name", "zs"]
    rc = main(tiny_args(tiny_run, *args, "--eval_tasks", SUITE, "--eval_limit", "2"))
    assert rc == 0
    summary = json.loads((tiny_run["logs"] / "zs" / "summary.json").read_text())
    before, after = (ZeroShotResult.from_dict(summary["zeroshot"][k]) for k in ("before", "after"))
    assert before.requested == STANDARD_TASKS
    assert all(t.num_samples == 2 for t in before.tasks.values())
    assert all(v.startswith("local ") for v in before.sources.values())
    assert summary["zeroshot_drop"]["after"] == json.loads(json.dumps(zeroshot_drop(before, after)))
    out = capsys.readouterr().out
    assert "mean score*" in out and "first 2 items per task" in out


def test_choice_logprob_takes_items_with_different_numbers_of_choices():
    import math

    from gqa_prune.evaluation.tasks import choice_logprob

    items = [(0, [-1.0, -1.0]), (2, [-900.0, -901.0, -899.0]), (1, [-3.0] * 4)]
    third = -899 - math.log(math.exp(-1) + math.exp(-2) + 1) + 899
    expected = (math.log(0.5) + third + math.log(0.25)) / 3
    assert choice_logprob(items) == pytest.approx(expected)  # stable at large |ll|
