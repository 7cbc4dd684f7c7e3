"""prune_model_: scores -> allocation (layer or global) -> plan -> slicing, on tiny models."""

import pytest
import torch

from gqa_prune.allocation import AllocationConfig
from gqa_prune.cli import main
from gqa_prune.errors import GQAPruneError
from gqa_prune.pipeline import prune_model_, select_gqa_groups_to_prune

from conftest import tiny_args, tiny_model


def test_select_groups_keeps_the_most_important():
    keep, prune = select_gqa_groups_to_prune(torch.tensor([0.5, 3.0, 0.1, 2.0]), 2)
    assert keep == [1, 3] and prune == [0, 2]
    with pytest.raises(GQAPruneError):
        select_gqa_groups_to_prune(torch.tensor([1.0]), 2)


@pytest.mark.parametrize("mode", ["layer", "global"])
def test_prune_model_hits_target_and_keeps_ratio(kind, mode):
    model = tiny_model(kind, num_hidden_layers=4, intermediate_size=128)
    ids = torch.randint(0, 128, (4, 16))
    importance = [4.0, 1.0, 2.0, 3.0]
    outcome = prune_model_(
        model,
        ids,
        AllocationConfig(pruning_ratio=0.3),
        importance,
        mode=mode,
        batch_size=2,
        progress=False,
    )
    before, after = outcome.before, outcome.after
    removed = (before.total_params - after.total_params) / before.total_params
    assert abs(removed - 0.3) <= 0.005
    assert removed == pytest.approx(outcome.allocation.achieved_ratio)
    assert all(q == kv * before.queries_per_kv for q, kv in zip(after.q_heads, after.kv_heads))
    assert min(after.kv_heads) >= 1
    if mode == "layer":  # inverse: the most important layer (0) keeps the most parameters
        kept = [after.attention_params(i) + after.mlp_params(i) for i in range(4)]
        assert kept[0] == max(kept) and kept[1] == min(kept)
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_unknown_mode_is_refused():
    model = tiny_model("llama4")
    with pytest.raises(GQAPruneError, match="pruning mode"):
        prune_model_(
            model,
            torch.randint(0, 128, (1, 8)),
            AllocationConfig(pruning_ratio=0.2),
            mode="everything",
            progress=False,
        )


def test_debug_run_on_a_layer_range(tmp_path):
    """The original debug command: a layer range and few samples (deep tiny model)."""
    from conftest import ENGLISH, save_tiny_model_dir

    model_dir = save_tiny_model_dir(tmp_path / "deep", num_hidden_layers=16)
    data = tmp_path / "data"
    for sub, name in (("wikitext-2-raw", "wiki.test.raw"), ("wikitext-2", "valid.txt")):
        (data / sub).mkdir(parents=True)
        (data / sub / name).write_text(ENGLISH * 20)
    run = {"model": str(model_dir), "data": str(data), "logs": tmp_path / "logs"}
    rc = main(
        tiny_args(
            run,
            "--layer_start",
            "10",
            "--layer_end",
            "15",
            "--layer_importance_samples",
            "10",
            "--channel_importance_samples",
            "5",
            "--pruning_ratio",
            "0.1",
            "--prune_mlp",
            "--save_ckpt_log_name",
            "dbg",
        )
    )
    assert rc == 0
    import json

    summary = json.loads((tmp_path / "logs" / "dbg" / "summary.json").read_text())
    layers = summary["layers"]
    untouched = [layer for layer in layers if not 10 <= layer["layer"] < 15]
    assert all(layer["mlp_size"] == 96 and layer["kv_heads"] == 2 for layer in untouched)
    assert abs(summary["actual_ratio_total"] - 0.1) <= 0.005
