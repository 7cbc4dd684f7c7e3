"""Model families: one adapter entry each; unsupported families are refused by name."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from gqa_prune.errors import GQAPruneError
from gqa_prune.models.adapters import ADAPTERS, get_adapter, supported_families
from gqa_prune.models.checkpoint import load_pruned, save_pruned
from gqa_prune.plan import LayerPlan, PruningPlan
from gqa_prune.slicing import apply_plan_

from conftest import HEADS, tiny_config, tiny_model


def test_every_test_family_has_an_adapter():
    families = {family for family, _ in HEADS.values()}
    assert families == {"llama", "mistral", "qwen2", "qwen3"}
    for family in families:
        assert get_adapter(family) is get_adapter(f"gqa_pruned_{family}")
        assert get_adapter(family).pruned_model_type == f"gqa_pruned_{family}"


@pytest.mark.parametrize("model_type", ["gpt2", "gemma2", "phi3", None])
def test_unsupported_family_is_refused_listing_the_supported_ones(model_type):
    with pytest.raises(GQAPruneError) as info:
        get_adapter(model_type if model_type else GPT2Config())
    message = str(info.value)
    assert "not supported" in message
    for family in ("llama", "mistral", "qwen2", "qwen3"):
        assert family in message
    assert "\n" not in message


def test_supported_families_names_each_family_once():
    assert supported_families() == "llama, mistral, qwen2, qwen3"
    assert len(ADAPTERS) == 8  # each family and its pruned alias


def test_qwen3_per_head_norms_survive_group_pruning(batch, tmp_path):
    """q_norm/k_norm act per head (shape head_dim), so slicing whole heads keeps them valid."""
    model = tiny_model("qwen3")
    norm_before = model.model.layers[0].self_attn.q_norm.weight.clone()
    geom = get_adapter(model).geometry(model)
    assert geom.head_dim == 16 != geom.hidden_size // 4  # explicit head_dim honoured
    plan = PruningPlan(
        tuple(LayerPlan(i, (1,), tuple(range(0, 96, 2))) for i in range(geom.num_layers)),
        geom.queries_per_kv,
        geom.head_dim,
    )
    apply_plan_(model, plan)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.out_features == 2 * 16 and attn.k_proj.out_features == 16
    torch.testing.assert_close(attn.q_norm.weight, norm_before)
    with torch.no_grad():
        expected = model(input_ids=batch).logits
    out = save_pruned(model, None, tmp_path / "q3")
    for other in (
        load_pruned(out, device="cpu")[0],
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval(),
    ):
        with torch.no_grad():
            torch.testing.assert_close(other(input_ids=batch).logits, expected)


def test_mistral_sliding_window_is_kept_in_the_checkpoint(tmp_path):
    model = tiny_model("mistral")
    assert tiny_config("mistral").sliding_window == 10
    out = save_pruned(model, None, tmp_path / "m")
    reloaded, _ = load_pruned(out, device="cpu")
    assert reloaded.config.sliding_window == 10
    assert type(reloaded).__name__ == "PrunedMistralForCausalLM"


def test_llama32_style_tied_embeddings_and_llama3_rope_reload(batch, tmp_path):
    """Llama 3.1/3.2 features: llama3 rope scaling and tied input/output embeddings."""
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    model = tiny_model("llama4", tie_word_embeddings=True, rope_parameters=rope)
    geom = get_adapter(model).geometry(model)
    plan = PruningPlan(
        tuple(LayerPlan(i, (0,), tuple(range(0, 96, 3))) for i in range(geom.num_layers)),
        geom.queries_per_kv,
        geom.head_dim,
    )
    apply_plan_(model, plan)
    with torch.no_grad():
        expected = model(input_ids=batch).logits
    out = save_pruned(model, None, tmp_path / "l32")
    reloaded, _ = load_pruned(out, device="cpu")
    assert reloaded.config.rope_parameters["rope_type"] == "llama3"
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=batch).logits, expected)
