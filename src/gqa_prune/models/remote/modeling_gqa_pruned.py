"""Causal LMs whose decoder layers have their own number of heads and MLP width.

Written by gqa-prune. Each class is the stock transformers class of its family; after
building it at the global size, every decoder layer's projections are re-created at the
per-layer sizes listed in the config, before the checkpoint's weights are loaded.
Attention in these families reshapes with ``-1`` heads and repeats KV heads by the Q:KV
ratio, which pruning keeps, so the stock forward (and KV cache) run unchanged.
"""

from torch import nn
from transformers import (
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)

from .configuration_gqa_pruned import (
    PrunedLlamaConfig,
    PrunedMistralConfig,
    PrunedQwen2Config,
    PrunedQwen3Config,
)


def _linear_like(
    old: nn.Linear, in_features: int, out_features: int, bias: bool = False
) -> nn.Linear:
    return nn.Linear(
        in_features,
        out_features,
        bias=bias or old.bias is not None,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )


def resize_layers_to_config(model: nn.Module) -> None:
    """Re-create q/k/v/o and gate/up/down of each layer at the sizes in ``model.config``.

    ``layer_output_bias: true`` (FLAP-style bias compensation) gives o_proj and down_proj a
    bias even where the family's ``attention_bias`` / ``mlp_bias`` would build none.
    """
    config = model.config
    out_bias = bool(getattr(config, "layer_output_bias", False))
    kv_heads = getattr(config, "layer_num_key_value_heads", None)
    inter = getattr(config, "layer_intermediate_sizes", None)
    n_q, n_kv = config.num_attention_heads, config.num_key_value_heads
    ratio = n_q // n_kv
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_q
    hidden = config.hidden_size
    for i, layer in enumerate(model.model.layers):
        if kv_heads is not None:
            attn = layer.self_attn
            n_kv_i = int(kv_heads[i])
            q_out, kv_out = n_kv_i * ratio * head_dim, n_kv_i * head_dim
            attn.q_proj = _linear_like(attn.q_proj, hidden, q_out)
            attn.k_proj = _linear_like(attn.k_proj, hidden, kv_out)
            attn.v_proj = _linear_like(attn.v_proj, hidden, kv_out)
            attn.o_proj = _linear_like(attn.o_proj, q_out, hidden, out_bias)
        if inter is not None:
            mlp = layer.mlp
            width = int(inter[i])
            mlp.gate_proj = _linear_like(mlp.gate_proj, hidden, width)
            mlp.up_proj = _linear_like(mlp.up_proj, hidden, width)
            mlp.down_proj = _linear_like(mlp.down_proj, width, hidden, out_bias)
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = width


class PrunedLlamaForCausalLM(LlamaForCausalLM):
    config_class = PrunedLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        resize_layers_to_config(self)


class PrunedMistralForCausalLM(MistralForCausalLM):
    config_class = PrunedMistralConfig

    def __init__(self, config):
        super().__init__(config)
        resize_layers_to_config(self)


class PrunedQwen2ForCausalLM(Qwen2ForCausalLM):
    config_class = PrunedQwen2Config

    def __init__(self, config):
        super().__init__(config)
        resize_layers_to_config(self)


class PrunedQwen3ForCausalLM(Qwen3ForCausalLM):
    config_class = PrunedQwen3Config

    def __init__(self, config):
        super().__init__(config)
        resize_layers_to_config(self)
