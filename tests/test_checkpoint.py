"""Pruned checkpoints reload (without and with remote code) to the same logits."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from gqa_prune.errors import GQAPruneError
from gqa_prune.models.adapters import get_adapter
from gqa_prune.models.checkpoint import load_pruned, save_pruned

from conftest import prune_unevenly_, tiny_model


def test_save_then_reload_both_ways(kind, batch, tmp_path):
    model = tiny_model(kind)
    prune_unevenly_(model)
    with torch.no_grad():
        expected = model(input_ids=batch).logits
    out = save_pruned(model, None, tmp_path / "ckpt")
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_gqa_pruned.py"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    with safe_open(out / "model.safetensors", "pt") as fh:
        assert len(list(fh.keys())) > 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"].startswith("gqa_pruned_")
    adapter = get_adapter(model)
    assert cfg["layer_num_key_value_heads"] == [
        adapter.attention_projections(layer)[1].out_features // cfg["head_dim"]
        for layer in model.model.layers
    ]

    reloaded, _ = load_pruned(out, device="cpu")
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(remote).__module__.startswith("transformers_modules")  # the shipped file
    for other in (reloaded, remote):
        with torch.no_grad():
            torch.testing.assert_close(other(input_ids=batch).logits, expected)
        generated = other.generate(batch[:1], max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert generated.shape == (1, batch.shape[1] + 4)
    # greedy decoding with the KV cache equals decoding without it
    with_cache = reloaded.generate(
        batch[:1], max_new_tokens=4, min_new_tokens=4, do_sample=False, use_cache=True
    )
    no_cache = reloaded.generate(
        batch[:1], max_new_tokens=4, min_new_tokens=4, do_sample=False, use_cache=False
    )
    assert torch.equal(with_cache, no_cache)


def test_existing_folder_is_not_overwritten(tmp_path):
    model = tiny_model("llama4")
    out = save_pruned(model, None, tmp_path / "ckpt")
    marker = out / "keep.txt"
    marker.write_text("user data")
    with pytest.raises(GQAPruneError, match="--overwrite"):
        save_pruned(model, None, out)
    assert marker.read_text() == "user data"
    save_pruned(model, None, out, overwrite=True)
    assert not marker.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_load_pruned_refuses_a_plain_folder(tmp_path):
    tiny_model("llama4").save_pretrained(tmp_path / "plain")
    with pytest.raises(GQAPruneError, match="not a gqa-prune checkpoint"):
        load_pruned(tmp_path / "plain")
