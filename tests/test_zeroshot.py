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
from gqa_prune.evaluation.zeroshot import evaluate_zeroshot, parse_tasks, task_manager

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
