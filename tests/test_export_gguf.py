"""GGUF export: per-layer metadata, tensor layout and values, tokenizers, Qwen3, refusals, CLI.

Files are read back with gguf.GGUFReader; that llama.cpp computes the same logits is
checked in tests/slow/test_gguf_llama_cpp.py (needs llama-cpp-python).
"""

from __future__ import annotations

import json
import math

import gguf
import numpy as np
import pytest
import torch
from cli_helpers import assert_one_error_line
from gguf_helpers import (
    HIDDEN,
    MLP_KEEP,
    VOCAB,
    _edit_checkpoint,
    _set,
    bpe_tokenizer,
    pruned_dir_at,
    pruned_model,
    read,
    spm_tokenizer,
    values,
)
from safetensors.torch import load_file, save_file

from gqa_prune import GQAPruneError, export_gguf, save_pruned
from gqa_prune.cli import main
from gqa_prune.export.gguf_rope import llama3_rope_factors, rope_deinterleave, rope_interleave

from conftest import save_tiny_model_dir, tiny_model


@pytest.fixture
def pruned_dir(tmp_path):
    return pruned_dir_at(tmp_path)


def test_per_layer_metadata_matches_config(pruned_dir, tmp_path):
    out = export_gguf(pruned_dir, tmp_path / "m.gguf", "f32")
    cfg = json.loads((pruned_dir / "config.json").read_text())
    fields, _ = read(out)
    ratio = cfg["num_attention_heads"] // cfg["num_key_value_heads"]
    assert fields["general.architecture"] == "deci"
    assert fields["deci.block_count"] == 3
    assert fields["deci.attention.head_count_kv"] == cfg["layer_num_key_value_heads"] == [1, 2, 1]
    assert fields["deci.attention.head_count"] == [kv * ratio for kv in [1, 2, 1]]
    assert fields["deci.feed_forward_length"] == cfg["layer_intermediate_sizes"] == list(MLP_KEEP)
    assert fields["deci.attention.key_length"] == fields["deci.rope.dimension_count"] == 8
    assert fields["deci.embedding_length"] == HIDDEN
    assert fields["deci.vocab_size"] == VOCAB
    assert fields["general.file_type"] == gguf.LlamaFileType.ALL_F32


def test_f32_tensors_equal_the_checkpoint(pruned_dir, tmp_path):
    out = export_gguf(pruned_dir, tmp_path / "m.gguf", "f32")
    _, tensors = read(out)
    src = load_file(pruned_dir / "model.safetensors")
    names = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    hf = {
        "attn_norm": "input_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    for i in range(3):
        names.update({f"blk.{i}.{g}.weight": f"model.layers.{i}.{h}.weight" for g, h in hf.items()})
    assert set(tensors) == set(names)
    for gguf_name, hf_name in names.items():
        got = torch.from_numpy(values(tensors[gguf_name]).copy())
        if gguf_name.split(".")[-2] in ("attn_q", "attn_k"):
            got = rope_deinterleave(got, 8)
        assert got.shape == src[hf_name].shape, gguf_name
        assert torch.equal(got, src[hf_name]), gguf_name


def test_f16_and_q8_0_types_and_values(pruned_dir, tmp_path):
    src = load_file(pruned_dir / "model.safetensors")
    F32, F16, Q8 = (gguf.GGMLQuantizationType[t] for t in ("F32", "F16", "Q8_0"))
    for outtype, matrix_type in (("f16", F16), ("q8_0", Q8)):
        fields, tensors = read(export_gguf(pruned_dir, tmp_path / f"{outtype}.gguf", outtype))
        assert fields["general.file_type"] in (
            gguf.LlamaFileType.MOSTLY_F16,
            gguf.LlamaFileType.MOSTLY_Q8_0,
        )
        assert tensors["blk.0.attn_norm.weight"].tensor_type == F32
        assert tensors["blk.0.ffn_gate.weight"].tensor_type == matrix_type
        # rows of 50 channels are not whole Q8_0 blocks of 32: f16 instead
        assert tensors["blk.2.ffn_down.weight"].tensor_type == F16
        w = src["model.layers.1.mlp.up_proj.weight"]
        got = torch.from_numpy(values(tensors["blk.1.ffn_up.weight"]).copy())
        tol = 1e-3 if outtype == "f16" else w.abs().max().item() / 127
        assert (got - w).abs().max().item() <= tol


def test_q8_0_file_is_smaller(pruned_dir, tmp_path):
    sizes = {
        t: export_gguf(pruned_dir, tmp_path / f"{t}.gguf", t).stat().st_size
        for t in ("f32", "f16", "q8_0")
    }
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]


def tiny_qwen3(**overrides):
    return pruned_model("qwen3", tie_word_embeddings=True, **overrides)


def test_qwen3_is_written_as_openelm_with_fused_qkv_and_qk_norms(tmp_path):
    folder = save_pruned(tiny_qwen3(), bpe_tokenizer(), tmp_path / "q3")
    src = load_file(folder / "model.safetensors")
    fields, tensors = read(export_gguf(folder, tmp_path / "q3.gguf", "f32"))
    assert fields["general.architecture"] == "openelm"
    assert fields["openelm.attention.head_count"] == [2, 4, 2]
    assert fields["openelm.attention.head_count_kv"] == [1, 2, 1]
    assert fields["openelm.feed_forward_length"] == list(MLP_KEEP)
    assert fields["openelm.attention.key_length"] == 16  # head_dim != hidden / heads
    assert "output.weight" not in tensors  # openelm always ties the output to token_embd
    for i in range(3):
        attn = f"model.layers.{i}.self_attn"
        qkv = torch.cat([src[f"{attn}.{p}_proj.weight"] for p in "qkv"])  # NEOX RoPE: as is
        assert torch.equal(
            torch.from_numpy(values(tensors[f"blk.{i}.attn_qkv.weight"]).copy()), qkv
        )
        for norm in ("q_norm", "k_norm"):
            got = values(tensors[f"blk.{i}.attn_{norm}.weight"])
            np.testing.assert_array_equal(got, src[f"{attn}.{norm}.weight"].numpy())


def test_qwen3_removed_attention_and_mlp_become_zero_blocks(tmp_path):
    from gqa_prune.slicing import prune_attention_by_gqa_groups

    model = tiny_qwen3()
    prune_attention_by_gqa_groups(model.model.layers[1], [], allow_removal=True)
    folder = save_pruned(model, bpe_tokenizer(), tmp_path / "q3")
    _edit_checkpoint(folder, ["model.layers.2.mlp."], layer_intermediate_sizes=_set(2, 0))
    fields, tensors = read(export_gguf(folder, tmp_path / "q3.gguf", "f32"))
    # the openelm graph runs attention and MLP in every layer: zero-output stand-ins
    assert fields["openelm.attention.head_count"][1] == 2
    assert fields["openelm.attention.head_count_kv"][1] == 1
    assert tensors["blk.1.attn_qkv.weight"].data.shape == (4 * 16, HIDDEN)
    assert not values(tensors["blk.1.attn_output.weight"]).any()
    assert fields["openelm.feed_forward_length"][2] == 1
    assert not values(tensors["blk.2.ffn_down.weight"]).any()


def test_attention_free_layer_has_no_heads_and_no_attention_tensors(pruned_dir, tmp_path):
    _edit_checkpoint(
        pruned_dir, ["model.layers.1.self_attn."], layer_num_key_value_heads=_set(1, 0)
    )
    fields, tensors = read(export_gguf(pruned_dir, tmp_path / "m.gguf", "f32"))
    assert fields["deci.attention.head_count"][1] == 0
    assert fields["deci.attention.head_count_kv"][1] == 0
    assert not [n for n in tensors if n.startswith("blk.1.attn")]
    assert "blk.1.ffn_gate.weight" in tensors


def test_attention_free_layer_0_becomes_a_zero_output_group(pruned_dir, tmp_path, caplog):
    _edit_checkpoint(
        pruned_dir, ["model.layers.0.self_attn."], layer_num_key_value_heads=_set(0, 0)
    )
    fields, tensors = read(export_gguf(pruned_dir, tmp_path / "m.gguf", "f32"))
    # llama.cpp takes the head size from layer 0's head count: one group, output zero
    assert fields["deci.attention.head_count"][0] == 4
    assert fields["deci.attention.head_count_kv"][0] == 1
    assert tensors["blk.0.attn_output.weight"].data.shape == (HIDDEN, 32)
    assert not values(tensors["blk.0.attn_output.weight"]).any()
    assert "layer 0 has no attention" in caplog.text


def test_removed_attention_from_pruning_exports(tmp_path):
    """Blocks removed by --allow_attention_removal; one keeps the old o_proj bias."""
    from gqa_prune.slicing import prune_attention_by_gqa_groups

    model = pruned_model("llama4", attention_bias=True)
    for i in (1, 2):
        prune_attention_by_gqa_groups(model.model.layers[i], [], allow_removal=True)
    model.model.layers[2].self_attn.bias = None  # as without attention_bias: no constant
    folder = save_pruned(model, bpe_tokenizer(), tmp_path / "removed")
    fields, tensors = read(export_gguf(folder, tmp_path / "m.gguf", "f32"))
    assert fields["deci.attention.head_count_kv"] == [1, 1, 0]
    # layer 1 adds a constant: one zero-weight group whose output bias is that constant
    assert not values(tensors["blk.1.attn_q.weight"]).any()
    bias = model.model.layers[1].self_attn.bias.detach().numpy()
    np.testing.assert_array_equal(values(tensors["blk.1.attn_output.bias"]), bias)
    assert not [n for n in tensors if n.startswith("blk.2.attn")]


def test_mlp_free_layer_becomes_a_zero_one_channel_mlp(pruned_dir, tmp_path):
    _edit_checkpoint(pruned_dir, ["model.layers.2.mlp."], layer_intermediate_sizes=_set(2, 0))
    fields, tensors = read(export_gguf(pruned_dir, tmp_path / "m.gguf", "q8_0"))
    # the deci graph drops a layer's attention output when its MLP width is 0
    assert fields["deci.feed_forward_length"] == [64, 96, 1]
    assert tensors["blk.2.ffn_down.weight"].data.shape == (HIDDEN, 1)
    assert not values(tensors["blk.2.ffn_down.weight"]).any()


def test_qwen2_biases_are_exported_and_rope_reordered(tmp_path):
    folder = save_pruned(pruned_model("qwen2"), bpe_tokenizer(), tmp_path / "q")
    src = load_file(folder / "model.safetensors")
    _, tensors = read(export_gguf(folder, tmp_path / "q.gguf", "f32"))
    for proj, gguf_name, reorder in (
        ("q", "attn_q", True),
        ("k", "attn_k", True),
        ("v", "attn_v", False),
    ):
        bias = src[f"model.layers.0.self_attn.{proj}_proj.bias"]
        expected = rope_interleave(bias, 8) if reorder else bias
        assert torch.equal(
            torch.from_numpy(values(tensors[f"blk.0.{gguf_name}.bias"]).copy()), expected
        )


def test_output_and_mlp_biases_are_exported(tmp_path):
    model = pruned_model(attention_bias=True, mlp_bias=True)
    folder = save_pruned(model, bpe_tokenizer(), tmp_path / "b")
    _, tensors = read(export_gguf(folder, tmp_path / "b.gguf", "f16"))
    for name in ("attn_output", "ffn_gate", "ffn_up", "ffn_down"):
        assert f"blk.2.{name}.bias" in tensors
        assert tensors[f"blk.2.{name}.bias"].tensor_type == gguf.GGMLQuantizationType.F32


def test_dense_folder_and_tied_embeddings(tmp_path):
    model = tiny_model("llama4", vocab_size=VOCAB, hidden_size=HIDDEN, tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "dense")
    bpe_tokenizer().save_pretrained(tmp_path / "dense")
    fields, tensors = read(export_gguf(tmp_path / "dense", tmp_path / "d.gguf", "f16"))
    assert fields["deci.attention.head_count"] == [8, 8, 8]
    assert fields["deci.attention.head_count_kv"] == [2, 2, 2]
    assert fields["deci.feed_forward_length"] == [96, 96, 96]
    assert "output.weight" not in tensors  # llama.cpp reuses token_embd


def _hf_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), -1)
    return x * torch.cat((cos, cos)) + rotated * torch.cat((sin, sin))


def _pairwise_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), -1).flatten(-2)


def test_rope_reorder_turns_hf_rope_into_ggml_rope():
    torch.manual_seed(0)
    d, heads = 8, 3
    w = torch.randn(heads * d, 5)
    theta = torch.rand(d // 2) * 3
    cos, sin = theta.cos(), theta.sin()
    hf = _hf_rope((w.T).reshape(5, heads, d), cos, sin)  # rope applied to q = x @ w.T
    ggml = _pairwise_rope(rope_interleave(w, d).T.reshape(5, heads, d), cos, sin)
    expected = rope_interleave(hf.reshape(5, -1).T, d).T.reshape(5, heads, d)
    torch.testing.assert_close(ggml, expected)
    assert torch.equal(rope_deinterleave(rope_interleave(w, d), d), w)


def test_llama3_rope_factors_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    config = LlamaConfig(
        hidden_size=2048, num_attention_heads=16, head_dim=128, rope_parameters=rope
    )
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / 500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128)
    torch.testing.assert_close(llama3_rope_factors(rope, 128), plain / scaled, rtol=1e-4, atol=0)
    assert math.isclose(llama3_rope_factors(rope, 128)[-1].item(), 8.0)


def test_refuses_existing_output_unless_overwrite(pruned_dir, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_text("keep me")
    with pytest.raises(GQAPruneError, match="already exists; pass --overwrite"):
        export_gguf(pruned_dir, out, "f16")
    assert out.read_text() == "keep me"
    export_gguf(pruned_dir, out, "f16", overwrite=True)
    assert read(out)[0]["general.architecture"] == "deci"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left


@pytest.mark.parametrize(
    "setup, words",
    [
        ("qwen3_untied", "untied lm_head"),
        ("qwen3_bias", "Qwen3 with biases"),
        ("extra_tensor", "have no place in a deci GGUF file"),
        ("char_tokenizer", "not byte-level"),
        ("spm_split", "split: true"),
        ("spm_missing_byte", "byte fallback needs all 256 byte tokens"),
        ("spm_nfkc", "normalizer step NFKC"),
        ("yarn", "rope type 'yarn'"),
        ("gelu", "hidden_act 'gelu'"),
        ("inconsistent", "disagrees with the weights"),
    ],
)
def test_refuses_what_llama_cpp_cannot_represent(pruned_dir, tmp_path, setup, words):
    folder = pruned_dir
    if setup.startswith("qwen3"):
        untied = setup == "qwen3_untied"
        model = pruned_model("qwen3", tie_word_embeddings=not untied, attention_bias=not untied)
        folder = save_pruned(model, bpe_tokenizer(), tmp_path / "qwen3")
    elif setup == "extra_tensor":
        weights = load_file(folder / "model.safetensors")
        weights["model.layers.0.self_attn.q_norm.weight"] = torch.ones(8)
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    elif setup == "char_tokenizer":
        folder = save_tiny_model_dir(tmp_path / "chars")
    elif setup.startswith("spm"):
        folder = save_pruned(pruned_model(), spm_tokenizer("first"), tmp_path / "spm")
        tok = json.loads((folder / "tokenizer.json").read_text())
        if setup == "spm_split":  # then "▁▁" could never be made
            tok["pre_tokenizer"]["split"] = True
        elif setup == "spm_missing_byte":
            del tok["model"]["vocab"]["<0x80>"]
        else:
            tok["normalizer"] = {"type": "NFKC"}
        (folder / "tokenizer.json").write_text(json.dumps(tok))
    else:
        change = {
            "yarn": {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
            "gelu": {"hidden_act": "gelu"},
            "inconsistent": {"layer_intermediate_sizes": [96, 96, 96]},
        }[setup]
        _edit_checkpoint(folder, [], **change)
    with pytest.raises(GQAPruneError, match=words.replace("(", r"\(")) as exc_info:
        export_gguf(folder, tmp_path / "x.gguf", "f16")
    assert "\n" not in str(exc_info.value)
    assert not (tmp_path / "x.gguf").exists()


def _family_folder(tmp_path, model_type):
    """A tiny dense Gemma 2 / Gemma 3 / Phi-3 folder, or (``gqa_pruned_*``) one pruned to
    different KV heads and MLP widths per layer and saved with save_pruned."""
    from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, Phi3Config

    from conftest import prune_unevenly_

    family = model_type.removeprefix("gqa_pruned_")
    config_cls = {"gemma2": Gemma2Config, "gemma3": Gemma3TextConfig, "phi3": Phi3Config}
    config = config_cls[family.removesuffix("_text")](
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = AutoModelForCausalLM.from_config(config)
    folder = tmp_path / model_type
    if family == model_type:
        model.save_pretrained(folder)
    else:
        prune_unevenly_(model)
        save_pruned(model, bpe_tokenizer(), folder)
    assert json.loads((folder / "config.json").read_text())["model_type"] == model_type
    return folder


GEMMA_WHY = "gemma/gemma2/gemma3 graphs build every layer with layer 0's head counts"


@pytest.mark.parametrize(
    "model_type, words",
    [
        ("gemma3_text", GEMMA_WHY),
        ("gemma2", GEMMA_WHY),
        ("gqa_pruned_gemma3", GEMMA_WHY),
        ("gqa_pruned_gemma2", "its per-layer gemma4 graph RMS-normalises V"),
        ("phi3", "does not split Phi-3's fused qkv_proj / gate_up_proj"),
        ("gqa_pruned_phi3", "llama.cpp's phi3 graph builds every layer with layer 0's"),
    ],
)
def test_refuses_gemma_and_phi3_naming_the_reason(tmp_path, model_type, words):
    folder = _family_folder(tmp_path, model_type)
    with pytest.raises(GQAPruneError, match=words) as exc_info:
        export_gguf(folder, tmp_path / "x.gguf", "f16")
    message = str(exc_info.value)
    assert "\n" not in message and f"'{model_type}'" in message
    assert "exportable families: llama, mistral, qwen2, qwen3" in message
    assert not (tmp_path / "x.gguf").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cli_refuses_gemma_in_one_line(tmp_path, capsys):
    folder = _family_folder(tmp_path, "gqa_pruned_gemma3")
    rc = main(["export-gguf", str(folder), str(tmp_path / "g.gguf")])
    assert_one_error_line(capsys, rc, "cannot be exported to GGUF: llama.cpp's gemma")
    assert not (tmp_path / "g.gguf").exists()


def _truncate_weights(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def _shard_and_lose_one(folder):
    """An index that names two shards, of which only the first is there."""
    names = list(load_file(folder / "model.safetensors"))
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {name: shards[i % 2] for i, name in enumerate(names)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize(
    "damage, words",
    [
        (_truncate_weights, "/model.safetensors is damaged or truncated"),
        (_shard_and_lose_one, " is incomplete: model-00002-of-00002.safetensors"),
        (lambda f: (f / "config.json").write_text("[]"), "/config.json is not a JSON object"),
        (lambda f: (f / "config.json").write_text("{"), "/config.json is not valid JSON"),
    ],
    ids=["truncated", "missing_shard", "config_not_object", "config_not_json"],
)
def test_cli_refuses_a_damaged_checkpoint(pruned_dir, tmp_path, capsys, damage, words):
    damage(pruned_dir)
    rc = main(["export-gguf", str(pruned_dir), str(tmp_path / "d.gguf")])
    assert_one_error_line(capsys, rc, f"{pruned_dir}{words}")  # names the damaged path
    assert not (tmp_path / "d.gguf").exists()


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_check_gguf_takes_the_whole_file_and_refuses_every_cut(pruned_dir, tmp_path, outtype):
    """The size check is exact: the written file passes, one byte less does not."""
    from gqa_prune.models.source_checks import check_gguf

    out = export_gguf(pruned_dir, tmp_path / "m.gguf", outtype)
    assert check_gguf(out)["general.architecture"] == "deci"
    data = out.read_bytes()
    cut = tmp_path / "cut.gguf"
    for size in [*range(0, 3000, 41), len(data) // 2, len(data) - 1]:
        cut.write_bytes(data[:size])
        with pytest.raises(GQAPruneError, match="cut.gguf is"):
            check_gguf(cut)


def test_cli_writes_and_reports(pruned_dir, tmp_path, capsys):
    out = tmp_path / "cli.gguf"
    assert main(["export-gguf", str(pruned_dir), str(out), "--outtype", "q8_0"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "MiB" in printed and "q8_0" in printed
    assert read(out)[0]["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0


def test_cli_user_errors_exit_2_with_one_line(pruned_dir, tmp_path, capsys):
    out = tmp_path / "cli.gguf"
    out.write_text("x")
    rc = main(["export-gguf", str(pruned_dir), str(out)])
    assert_one_error_line(capsys, rc, "already exists")
    rc = main(["export-gguf", str(tmp_path / "missing"), str(tmp_path / "y.gguf")])
    assert_one_error_line(capsys, rc, "not a model folder")
    with pytest.raises(SystemExit) as exc_info:
        main(["export-gguf", str(pruned_dir), str(out), "--outtype", "q4_0"])
    assert exc_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
