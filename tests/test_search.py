"""The in-process split search equals pruning each candidate directly, and picks the best."""

import copy
import json

import pytest
import torch
from cli_helpers import assert_one_error_line

from gqa_prune.allocation import AllocationConfig
from gqa_prune.cli import main
from gqa_prune.data import sample_calibration, tokenize_text
from gqa_prune.errors import GQAPruneError
from gqa_prune.evaluation.perplexity import evaluate_perplexity
from gqa_prune.pipeline import prune_model_
from gqa_prune.reporting.search_plots import format_search_table
from gqa_prune.search import (
    SearchConfig,
    parse_distributions,
    search_distributions,
    split_validation,
)

from conftest import ENGLISH, char_tokenizer, tiny_args, tiny_model

TEXT = (ENGLISH + ENGLISH[::-1]) * 10
SPLITS = ((0.0, 10.0), (3.0, 7.0), (6.0, 4.0))


@pytest.mark.parametrize(
    "selection, target",
    [("score", "local"), ("repair", "dense"), ("repair", "0.25")],
)
def test_search_equals_direct_pruning_and_picks_the_best(selection, target):
    model, tok = tiny_model("llama4", seed=5), char_tokenizer()
    dense_state = copy.deepcopy(model.state_dict())
    config = SearchConfig(
        distributions=SPLITS,
        allocation=AllocationConfig(pruning_ratio=0.25, alpha=2.0),
        layer_importance_method="removal",
        layer_importance_samples=2,
        criterion="taylor",
        calibration_samples=2,
        seq_len=32,
        batch_size=2,
        validation_fraction=0.2,
        eval_seq_len=32,
        eval_max_windows=6,
        compensation="lstsq",
        compensation_samples=2,
        compensation_seq_len=24,
        selection=selection,
        compensation_target=target,
        seed=3,
    )
    result = search_distributions(model, tok, TEXT, config, progress=False)
    # the dense model is left as it was
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in dense_state.items())

    # each candidate, pruned directly by prune_model_ on a fresh copy, gives the same number
    calib_tokens, val_tokens = split_validation(tokenize_text(tok, TEXT), 0.2)
    assert result.validation["first_token"] == calib_tokens.numel()
    calibration = sample_calibration(calib_tokens, 2, 32, seed=3)
    compensation = sample_calibration(calib_tokens, 2, 24, seed=5)  # seed + 2, as gqa-prune
    direct = []
    for dist in SPLITS:
        copy_ = copy.deepcopy(model)
        prune_model_(
            copy_,
            calibration,
            AllocationConfig(pruning_ratio=0.25, alpha=2.0, distribution=dist),
            layer_importance=result.layer_importance,
            criterion="taylor",
            batch_size=2,
            seed=3,
            progress=False,
            compensation="lstsq",
            compensation_ids=compensation,
            selection=selection,
            compensation_target=target,
        )
        direct.append(evaluate_perplexity(copy_, val_tokens, 32, 6, progress=False).ppl)
    found = [c.ppl for c in result.candidates]
    assert found == pytest.approx(direct, rel=1e-5)
    assert len({round(p, 4) for p in direct}) == len(direct)  # the splits really differ
    assert result.best == min(range(len(direct)), key=direct.__getitem__)
    assert [c.distribution for c in result.candidates] == list(SPLITS)
    for c in result.candidates:
        assert abs(c.achieved_ratio - 0.25) <= 0.005
    # more attention share -> more KV heads removed
    attn = [c.attention_ratio for c in result.candidates]
    assert attn == sorted(attn) and attn[0] == 0 < attn[-1]
    assert result.dense_ppl == pytest.approx(
        evaluate_perplexity(model, val_tokens, 32, 6, progress=False).ppl
    )
    table = format_search_table(result)
    assert f"{result.best_candidate.label}" in table.splitlines()[-1]


@pytest.mark.parametrize(
    "text, words",
    [
        ("1-9", "not of the form a:m"),
        ("1:9,,2:8", "not of the form a:m"),
        ("1:2:3", "not of the form a:m"),
        ("x:9", "not of the form a:m"),
        ("-1:5", "non-negative"),
        ("0:0", "not both zero"),
        ("inf:1", "finite"),
        ("1:9,2:18", "repeats the attention share"),
        ("", "empty"),
    ],
)
def test_malformed_distributions(text, words):
    with pytest.raises(GQAPruneError, match=words):
        parse_distributions(text)


def test_parse_and_split():
    assert parse_distributions(" 0:10, 2.5:7.5 ") == ((0.0, 10.0), (2.5, 7.5))
    head, tail = split_validation(torch.arange(100), 0.25)
    assert torch.equal(torch.cat([head, tail]), torch.arange(100)) and tail.numel() == 25
    for bad in (0.0, 1.0):
        with pytest.raises(GQAPruneError, match="--validation_fraction"):
            split_validation(torch.arange(100), bad)


def search_args(tiny_run, *extra):
    args = tiny_args(tiny_run, "--save_ckpt_log_name", "s", "--eval_max_windows", "3", *extra)
    return ["search", *args]


def test_search_command_writes_table_json_and_plot(tiny_run, capsys):
    rc = main(
        search_args(
            tiny_run,
            "--distributions",
            "0:10,4:6",
            "--pruning_ratio",
            "0.25",
            "--importance",
            "magnitude",
            "--validation_fraction",
            "0.3",
        )
    )
    assert rc == 0
    out = capsys.readouterr().out
    data = json.loads((tiny_run["logs"] / "s" / "search.json").read_text())
    assert data["best_distribution"] in ("0:10", "4:6")
    assert data["validation"]["split"].startswith("calibration")
    assert [c["distribution"] for c in data["candidates"]] == [[0.0, 10.0], [4.0, 6.0]]
    assert (tiny_run["logs"] / "s" / "search_distributions.png").read_bytes()[:4] == b"\x89PNG"
    assert "val ppl" in out and f"best split {data['best_distribution']}" in out


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--distributions", "1:9,oops"], "--distributions item 'oops' is not of the form a:m"),
        (["--distributions", "1:9", "--validation_fraction", "1.5"], "--validation_fraction"),
        (["--distributions", "1:9", "--pruning_ratio", "2"], "--pruning_ratio"),
        (
            ["--distributions", "1:9", "--compensation_target", "dense", "--compensation", "bias"],
            "needs --compensation lstsq",
        ),
    ],
)
def test_search_command_bad_input(tiny_run, capsys, extra, words):
    assert main(search_args(tiny_run, *extra)) == 2
    assert_one_error_line(capsys, 2, words)
    assert not (tiny_run["logs"] / "s").exists()


@pytest.mark.parametrize("rank_by", ["zeroshot", "logprob"])
def test_rank_by_zeroshot_uses_only_validation_files(tmp_path, monkeypatch, rank_by):
    """Each candidate's score (accuracy and right-choice log-probability) equals evaluating
    that split's pruned model directly on the validation files; the best is the highest by
    the chosen measure; the test files are never read."""
    from test_zeroshot import write_suite

    from gqa_prune.evaluation.zeroshot import evaluate_zeroshot

    folder = write_suite(tmp_path / "zs")
    for task in ("arc_easy", "arc_challenge", "openbookqa"):  # reading these would fail
        (folder / task / "test.jsonl").write_text('{"broken": true}\n')
    model, tok = tiny_model("llama4", seed=5), char_tokenizer()
    splits = ((0.0, 10.0), (6.0, 4.0))
    config = SearchConfig(
        distributions=splits,
        allocation=AllocationConfig(pruning_ratio=0.25, alpha=2.0),
        layer_importance_samples=2,
        criterion="magnitude",
        calibration_samples=2,
        seq_len=32,
        batch_size=2,
        validation_fraction=0.2,
        eval_seq_len=32,
        eval_max_windows=2,
        compensation="none",
        seed=3,
        rank_by=rank_by,
        zeroshot_data_dir=str(folder),
    )
    result = search_distributions(model, tok, TEXT, config, progress=False)
    assert result.rank_by == rank_by
    assert result.zeroshot_validation["split"] == "validation"
    assert result.zeroshot_validation["tasks"] == ["arc_easy", "arc_challenge", "openbookqa"]
    assert all(f.endswith("validation.jsonl") for f in result.zeroshot_validation["files"].values())
    calib_tokens, _ = split_validation(tokenize_text(tok, TEXT), 0.2)
    calibration = sample_calibration(calib_tokens, 2, 32, seed=3)
    direct, logprobs = [], []
    for dist in splits:
        copy_ = copy.deepcopy(model)
        prune_model_(
            copy_,
            calibration,
            AllocationConfig(pruning_ratio=0.25, alpha=2.0, distribution=dist),
            layer_importance=result.layer_importance,
            criterion="magnitude",
            batch_size=2,
            seed=3,
            progress=False,
            compensation="none",  # as the search was told
        )
        zs = evaluate_zeroshot(
            copy_, tok, "zeroshot6", split="validation", zeroshot_data_dir=folder
        )
        direct.append(zs.mean_score)
        logprobs.append(zs.mean_logprob)
    assert [c.zeroshot for c in result.candidates] == pytest.approx(direct)
    assert [c.zeroshot_logprob for c in result.candidates] == pytest.approx(logprobs)
    assert all(lp is not None and lp < 0 for lp in logprobs)
    dense = evaluate_zeroshot(model, tok, "zeroshot6", split="validation", zeroshot_data_dir=folder)
    assert result.dense_zeroshot == pytest.approx(dense.mean_score)
    assert result.dense_zeroshot_logprob == pytest.approx(dense.mean_logprob)
    measure = direct if rank_by == "zeroshot" else logprobs
    best = max(range(len(measure)), key=lambda i: (measure[i], -result.candidates[i].ppl))
    assert result.best == best
    table = format_search_table(result)
    assert "val zero-shot" in table and "val logprob" in table and "VALIDATION split" in table
    assert ("log-probability of the right choice" in table) == (rank_by == "logprob")


@pytest.mark.parametrize("rank_by", ["zeroshot", "logprob"])
def test_search_command_rank_by_zeroshot_missing_file(tiny_run, capsys, tmp_path, rank_by):
    from test_zeroshot import write_suite

    folder = write_suite(tmp_path / "zs", splits=("test",))  # no validation files
    rc = main(
        search_args(
            tiny_run, "--distributions", "0:10,4:6", "--rank_by", rank_by,
            "--zeroshot_data_dir", str(folder),
        )
    )  # fmt: skip
    assert_one_error_line(capsys, rc, str(folder / "arc_easy" / "validation.jsonl"))
    assert not (tiny_run["logs"] / "s").exists()


@pytest.mark.parametrize("rank_by", ["ppl", "zeroshot", "logprob"])
def test_search_plot_shows_the_ranking_measure(tmp_path, rank_by):
    from gqa_prune.reporting.search_plots import _plotted, plot_search
    from gqa_prune.search import Candidate, SearchResult

    def cand(a, ppl, acc, lp):
        return Candidate((a, 10 - a), a / 10, ppl, 0.25, 0.1, 0.3, 100, None, acc, {}, lp)

    result = SearchResult(
        candidates=(cand(1, 90.0, 0.30, -6.5), cand(2, 95.0, 0.28, -6.1)),
        best=1,
        dense_ppl=60.0,
        pruning_ratio=0.25,
        validation={"dataset": "x", "num_tokens": 10},
        layer_importance=(1.0,),
        layer_importance_method="removal",
        rank_by=rank_by,
        dense_zeroshot=0.35,
        dense_zeroshot_logprob=-5.0,
    )
    value, dense, ylabel = _plotted(result)
    expected = {
        "ppl": ([90.0, 95.0], 60.0, "perplexity"),
        "zeroshot": ([0.30, 0.28], 0.35, "zero-shot score"),
        "logprob": ([-6.5, -6.1], -5.0, "log-probability"),
    }[rank_by]
    assert [value(c) for c in result.candidates] == expected[0]
    assert dense == expected[1] and expected[2] in ylabel
    path = plot_search(tmp_path / "s.png", result)
    assert path.read_bytes()[:4] == b"\x89PNG"
