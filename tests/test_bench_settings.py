"""bench/bench_quality.py's ``KEY=VALUE`` overrides are typed like the RunConfig fields."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_quality import (  # noqa: E402
    method_settings,
    parse_settings,
    seed_spread,
    with_seeds,
)

from gqa_prune.config import RunConfig  # noqa: E402


def test_optional_int_fields_become_ints():
    # layer_start / layer_end default to None: they used to stay strings ("4" > "28")
    got = parse_settings(["layer_start=4", "layer_end=28"])
    assert got == {"layer_start": 4, "layer_end": 28}
    RunConfig(**got)  # the config accepts them and sees 4 < 28


def test_typed_like_the_default_and_none_for_optional():
    got = parse_settings(["alpha=1", "compensation_samples=256", "layer_end=none"])
    assert got["alpha"] == 1.0 and isinstance(got["alpha"], float)
    assert got["compensation_samples"] == 256 and isinstance(got["compensation_samples"], int)
    assert got["layer_end"] is None


def test_method_presets_with_overrides():
    got = method_settings("sensitivity-grad@layer_start=2@compensation_target=0.25")
    assert got["pruning_mode"] == "sensitivity" and got["sensitivity_weights"] == "gradient"
    assert got["layer_start"] == 2 and got["compensation_target"] == "0.25"
    with pytest.raises(SystemExit, match="unknown RunConfig setting"):
        parse_settings(["no_such_setting=1"])


def test_booleans_parse_false_as_false():
    # bool("0") and bool("false") are True: the flag must not flip on by its negation
    assert parse_settings(["allow_attention_removal=false"]) == {"allow_attention_removal": False}
    assert parse_settings(["allow_attention_removal=0"]) == {"allow_attention_removal": False}
    assert parse_settings(["allow_attention_removal=True"]) == {"allow_attention_removal": True}
    with pytest.raises(SystemExit, match="not a boolean"):
        parse_settings(["allow_attention_removal=maybe"])


def test_zeroshot_suite_reaches_the_task_resolver(monkeypatch):
    import zeroshot_column
    from bench_quality import build_parser

    seen = []
    monkeypatch.setattr(zeroshot_column, "prepare_tasks", lambda t, **kw: seen.append(t))
    args = build_parser().parse_args(["--zeroshot_suite", "piqa,arc_easy"])
    zeroshot_column.ZeroShotColumn.create(10, "test", "/data", tasks=args.zeroshot_suite)
    zeroshot_column.ZeroShotColumn.create(10, "test", "/data")
    assert seen == ["piqa,arc_easy", "zeroshot6"]
    assert build_parser().parse_args([]).zeroshot_suite == "zeroshot6"


def test_perplexity_windows_follow_the_cli_setting():
    from bench_quality import build_parser

    assert build_parser().parse_args([]).eval_seq_len == RunConfig().eval_seq_len
    assert build_parser().parse_args(["--eval_seq_len", "512"]).eval_seq_len == 512


def test_every_pruning_setting_reaches_prune_model(monkeypatch):
    """A ``@KEY=VALUE`` override of a setting that ``prune_model_`` takes must reach it:
    the bench rows would silently measure the default otherwise."""
    import inspect

    import bench_quality
    import torch

    from gqa_prune.pipeline import prune_model_

    seen = {}
    monkeypatch.setattr(bench_quality, "prune_model_", lambda *a, **kw: seen.update(kw))
    fields = set(RunConfig.__dataclass_fields__)
    # streaming: the bench prunes in memory (a streamer object, not the CLI's flag)
    takes = [p for p in inspect.signature(prune_model_).parameters if p in fields - {"streaming"}]
    assert "compensation_target_norm" in takes and "compensation_damp" in takes
    c = RunConfig(
        compensation_target="0.25",
        compensation_target_norm="dense",
        compensation_damp=0.7,
        pruning_mode="sensitivity",
    )
    tokens = torch.arange(4000) % 100
    bench_quality.prune_like_the_cli(torch.nn.Linear(1, 1), c, tokens, None)
    missing = [name for name in takes if seen.get(name) != getattr(c, name)]
    assert not missing, f"prune_like_the_cli does not pass {missing}"


def test_recovery_rows_train_on_the_calibration_tokens(monkeypatch):
    """``@finetune=true`` recovers with the row's settings on the prune's calibration tokens;
    distillation gets a frozen copy of the dense model, and another text is refused."""
    import bench_quality
    import torch

    from gqa_prune.recovery.config import FinetuneResult

    calls = []

    def fake_finetune(model, tokenizer, config, teacher=None, *, tokens=None):
        calls.append((config, teacher, tokens))
        return FinetuneResult(config.method, steps=1, tokens=128)

    monkeypatch.setattr(bench_quality, "finetune_", fake_finetune)
    dense, pruned = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    tokens = torch.arange(50)
    settings = method_settings("default@finetune=true@finetune_method=distill@lora_r=4")
    c = RunConfig(**settings)
    bench_quality.recover_like_the_cli(pruned, dense, None, c, tokens)
    config, teacher, seen = calls[-1]
    assert config.method == "distill" and seen is tokens
    assert teacher is not dense and not any(p.requires_grad for p in teacher.parameters())
    assert torch.equal(teacher.weight, dense.weight) and dense.weight.requires_grad
    assert not pruned.training
    bench_quality.recover_like_the_cli(pruned, dense, None, RunConfig(finetune=True), tokens)
    assert calls[-1][0].method == "lora" and calls[-1][1] is None
    other = RunConfig(finetune=True, finetune_dataset="wikitext2_test")
    with pytest.raises(SystemExit, match="calibration text only"):
        bench_quality.recover_like_the_cli(pruned, dense, None, other, tokens)


def test_seeds_repeat_every_method_and_reach_the_config():
    names = with_seeds(["default", "sensitivity-grad@compensation_target=0.25"], [42, 43])
    assert names == [
        "default@seed=42",
        "default@seed=43",
        "sensitivity-grad@compensation_target=0.25@seed=42",
        "sensitivity-grad@compensation_target=0.25@seed=43",
    ]
    assert RunConfig(**method_settings(names[1])).seed == 43
    assert with_seeds(["default"], []) == ["default"]
    with pytest.raises(SystemExit, match="sets its own seed"):
        with_seeds(["default@seed=1"], [42])
    with pytest.raises(SystemExit, match="named twice"):
        with_seeds(["default"], [42, 42])


def test_seed_spread_is_the_mean_and_sample_sd():
    got = seed_spread({"default": [(0.39, 87.0), (0.40, 86.0), (0.41, 85.0)], "one": [(0.5, 9.0)]})
    # mean 0.40, sd sqrt(((0.01)^2 * 2) / 2) = 0.01; perplexity 86.00 (1.00)
    assert got[0] == ("default", 3, "0.4000 (0.0100)", "86.00 (1.00)")
    assert got[1] == ("one", 1, "0.5000", "9.00")
    # a row without zero-shot leaves the column blank instead of averaging fewer seeds
    assert seed_spread({"m": [(None, 10.0), (0.3, 12.0)]})[0][2] == "-"
