"""Tiny random-weight models built from configs, shared by the unit tests."""

from __future__ import annotations

import os

# unit tests never reach a hub: fail fast instead of waiting for network time-outs
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

CONFIGS = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "gemma2": Gemma2Config,
    "gemma3_text": Gemma3TextConfig,
    "phi3": Phi3Config,
}
# Gemma: head_dim != hidden/heads, a sliding window (6) shorter than the tests' sequences and
# sliding/full layers mixed (Gemma 3: 5 of 6 sliding; Gemma 2: alternating)
_GEMMA = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=6)
_SLIDING = ["sliding_attention", "full_attention", "sliding_attention"]
# Phi-3: fused qkv_proj / gate_up_proj; Phi3Config's default pad/eos ids exceed the tiny vocab
_PHI3 = dict(num_attention_heads=6, num_key_value_heads=2, pad_token_id=None, eos_token_id=2)
HEADS = {  # kind -> (family, heads settings)
    # Phi-4-mini style: partial rotary (only the first half of each head rotated)
    "phi3": ("phi3", dict(partial_rotary_factor=0.5, **_PHI3)),
    # Phi-3 style: full rotary; Phi-4-mini's tied embeddings (not in KINDS: test_fused_phi3.py)
    "phi3_tied": ("phi3", dict(tie_word_embeddings=True, **_PHI3)),
    "llama4": ("llama", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8)),
    "llama3": ("llama", dict(num_attention_heads=6, num_key_value_heads=2, head_dim=8)),
    "mha": ("llama", dict(num_attention_heads=4, num_key_value_heads=4)),
    "qwen2": ("qwen2", dict(num_attention_heads=6, num_key_value_heads=3, head_dim=8)),
    # a sliding window shorter than the generation tests' sequences
    "mistral": (
        "mistral",
        dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8, sliding_window=10),
    ),
    "qwen3": ("qwen3", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16)),
    # Gemma-3-4B/12B/27B style: 2+ KV heads, q/k norms, sandwich norms
    "gemma3": (
        "gemma3_text",
        dict(num_attention_heads=4, num_key_value_heads=2, layer_types=_SLIDING, **_GEMMA),
    ),
    # Gemma-3-270M/1B style: ONE KV head, so attention can only be kept whole or removed
    # (not in KINDS: the per-kind tests remove single groups; see test_families.py)
    "gemma3_1kv": (
        "gemma3_text",
        dict(
            num_attention_heads=4,
            num_key_value_heads=1,
            layer_types=_SLIDING,
            tie_word_embeddings=True,
            **_GEMMA,
        ),
    ),
    # soft-capping small enough to act on tiny random logits
    "gemma2": (
        "gemma2",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            layer_types=_SLIDING,
            attn_logit_softcapping=0.5,
            final_logit_softcapping=0.3,
            **_GEMMA,
        ),
    ),
}


def tiny_config(kind: str = "llama4", **overrides):
    """Tiny decoder configs of every supported family.

    Llama with Q:KV 4:1, 3:1 and 1:1 (MHA, as Llama-2), Qwen2 with q/k/v biases, Mistral with
    a sliding window, Qwen3 with per-head q_norm/k_norm and head_dim != hidden/heads, Gemma 3
    (2 KV heads, and 1 as in the 270M) and Gemma 2 with soft-capping.
    """
    family, heads = HEADS[kind]
    values = dict(
        vocab_size=128,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    values.update(heads)
    values.update(overrides)
    if "layer_types" in heads and "layer_types" not in overrides:  # one per layer, cycled
        n, types = values["num_hidden_layers"], heads["layer_types"]
        values["layer_types"] = [types[i % len(types)] for i in range(n)]
    return CONFIGS[family](**values)


def tiny_model(kind: str = "llama4", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, **overrides), dtype=torch.float32)
    # random biases and norm weights, so that slicing them is really exercised
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.1)
            elif "RMSNorm" in type(module).__name__:  # q_norm/k_norm and layer norms
                module.weight.normal_(1.0, 0.1)
    return model.eval()


def prune_unevenly_(model):
    """Different KV-group counts and MLP widths per layer (layer i keeps every (i+1)-th channel).

    Returns:
        The applied PruningPlan.
    """
    from gqa_prune.models.adapters import get_adapter
    from gqa_prune.plan import LayerPlan, PruningPlan
    from gqa_prune.slicing import apply_plan_

    geom = get_adapter(model).geometry(model)
    n_kv = geom.kv_heads[0]
    plan = PruningPlan(
        tuple(
            LayerPlan(i, tuple(range(i % n_kv, n_kv)), tuple(range(0, 96, i + 1)))
            for i in range(geom.num_layers)
        ),
        geom.queries_per_kv,
        geom.head_dim,
    )
    apply_plan_(model, plan)
    return plan


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: on a busy 2-core machine, intra-op threads only add waiting (10-100x)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


KINDS = ["llama4", "llama3", "mha", "qwen2", "mistral", "qwen3", "gemma3", "gemma2", "phi3"]


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


@pytest.fixture
def batch():
    torch.manual_seed(1)
    return torch.randint(0, 128, (2, 12))


def char_tokenizer():
    """A character-level fast tokenizer (ids < 128) built in memory: no download."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def save_tiny_model_dir(path, kind: str = "llama4", seed: int = 0, **overrides):
    """A tiny random model + tokenizer saved as a Hugging Face folder."""
    model = tiny_model(kind, seed=seed, **overrides)
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


ENGLISH = (
    "The quick brown fox jumps over the lazy dog. Pruning removes whole groups of heads "
    "and channels from a model, and the remaining weights must still predict text well. "
)


@pytest.fixture
def tiny_run(tmp_path):
    """A tiny model folder, a data folder with both WikiText-2 splits, and a log root."""
    model_dir = save_tiny_model_dir(tmp_path / "tiny-llama")
    data = tmp_path / "data"
    (data / "wikitext-2-raw").mkdir(parents=True)
    (data / "wikitext-2").mkdir(parents=True)
    (data / "wikitext-2-raw" / "wiki.test.raw").write_text(ENGLISH * 20)
    (data / "wikitext-2" / "valid.txt").write_text(ENGLISH[::-1] * 20)
    return {"model": str(model_dir), "data": str(data), "logs": tmp_path / "logs"}


def tiny_args(run, *extra):
    """Fast CLI arguments for the tiny model."""
    return [
        "--base_model",
        run["model"],
        "--data_dir",
        run["data"],
        "--log_root",
        str(run["logs"]),
        "--channel_importance_samples",
        "2",
        "--layer_importance_samples",
        "2",
        "--taylor_seq_len",
        "32",
        "--compensation_seq_len",
        "32",
        "--eval_seq_len",
        "32",
        "--eval_max_windows",
        "4",
        "--device",
        "cpu",
        *extra,
    ]


# property tests draw the same examples on every run (CI must not be flaky); a developer can
# explore new draws with --hypothesis-profile=explore
from hypothesis import settings as _hyp_settings  # noqa: E402

_hyp_settings.register_profile("ci", derandomize=True, deadline=None)
_hyp_settings.register_profile("explore", deadline=None)
_hyp_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
