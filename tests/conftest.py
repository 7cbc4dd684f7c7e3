"""Tiny random-weight models built from configs, shared by the unit tests."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config


def tiny_config(kind: str = "llama4", **overrides):
    """Tiny decoder configs: Q:KV 4:1, 3:1, 1:1 (Llama) and Qwen2 with q/k/v biases."""
    base = dict(
        vocab_size=128,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    if kind == "llama4":
        cfg = LlamaConfig(**base, num_attention_heads=8, num_key_value_heads=2, head_dim=8)
    elif kind == "llama3":
        cfg = LlamaConfig(**base, num_attention_heads=6, num_key_value_heads=2, head_dim=8)
    elif kind == "mha":
        cfg = LlamaConfig(**base, num_attention_heads=4, num_key_value_heads=4)
    elif kind == "qwen2":
        cfg = Qwen2Config(**base, num_attention_heads=6, num_key_value_heads=3, head_dim=8)
    else:
        raise ValueError(kind)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(kind: str = "llama4", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, **overrides), dtype=torch.float32)
    # random biases and norm weights, so that slicing them is really exercised
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.1)
    return model.eval()


KINDS = ["llama4", "llama3", "mha", "qwen2"]


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


@pytest.fixture
def batch():
    torch.manual_seed(1)
    return torch.randint(0, 128, (2, 12))
