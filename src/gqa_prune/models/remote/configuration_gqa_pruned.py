"""Configs of GQA-pruned models: the family's config plus per-layer shapes.

Written by gqa-prune. Extra fields (one entry per decoder layer):
    layer_num_key_value_heads: KV heads kept in each layer (Q heads = KV heads x Q:KV ratio).
    layer_intermediate_sizes: MLP width of each layer.
    layer_output_bias (optional, default false): o_proj and down_proj carry a bias in every
        layer (FLAP-style bias compensation), whatever attention_bias / mlp_bias say.
The global ``num_attention_heads`` / ``num_key_value_heads`` keep the unpruned values, so
the Q:KV ratio and ``head_dim`` (stored explicitly) stay those of the original model.
"""

from transformers import (
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)


class PrunedLlamaConfig(LlamaConfig):
    model_type = "gqa_pruned_llama"


class PrunedMistralConfig(MistralConfig):
    model_type = "gqa_pruned_mistral"


class PrunedQwen2Config(Qwen2Config):
    model_type = "gqa_pruned_qwen2"


class PrunedQwen3Config(Qwen3Config):
    model_type = "gqa_pruned_qwen3"


class PrunedGemma2Config(Gemma2Config):
    model_type = "gqa_pruned_gemma2"


class PrunedGemma3Config(Gemma3TextConfig):
    model_type = "gqa_pruned_gemma3"


class PrunedPhi3Config(Phi3Config):
    model_type = "gqa_pruned_phi3"
