"""Causal LMs whose decoder layers have their own number of heads and MLP width.

Written by gqa-prune. Each class is the stock transformers class of its family; after
building it at the global size, every decoder layer's projections are re-created at the
per-layer sizes listed in the config, before the checkpoint's weights are loaded.
Attention in these families reshapes with ``-1`` heads and repeats KV heads by the Q:KV
ratio, which pruning keeps, so the stock forward (and KV cache) run unchanged. A layer
with 0 KV heads has no attention at all: :class:`RemovedAttention` stands in for it.
Phi-3 keeps its fused ``qkv_proj`` / ``gate_up_proj`` (at each layer's size); its attention
reads the query-head count from the config, so each layer gets a :class:`LayerAttentionConfig`.
"""

from typing import Any

import torch
from torch import nn
from transformers import (
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    LlamaForCausalLM,
    MistralForCausalLM,
    Phi3ForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)

from .configuration_gqa_pruned import (
    PrunedGemma2Config,
    PrunedGemma3Config,
    PrunedLlamaConfig,
    PrunedMistralConfig,
    PrunedPhi3Config,
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


class RemovedAttention(nn.Module):
    """An attention block pruned away entirely: it adds nothing (or a constant bias).

    The decoder layer's residual ``h + attn(norm(h))`` becomes ``h + b`` (``b`` = 0 when
    the removed o_proj had no bias; with Gemma's sandwich norms ``h + post_norm(b)``, what
    an o_proj with all columns zeroed gives). It still appends one width-1 placeholder
    key/value per token to the KV cache (a few bytes), because transformers reads the
    cache's length from layer 0 to place new tokens (and the sliding-window mask sizes from
    the first sliding layer); with nothing stored there, positions would restart at 0. Its
    only parameter is the optional ``bias`` (shape ``(hidden_size,)``).
    """

    is_removed_attention = True

    def __init__(self, hidden_size, head_dim, layer_idx, bias=False, dtype=None, device=None):
        super().__init__()
        self.head_dim = head_dim
        self.layer_idx = layer_idx
        self.num_key_value_heads = 0
        self.num_heads = 0
        self.bias = (
            nn.Parameter(torch.zeros(hidden_size, dtype=dtype, device=device)) if bias else None
        )

    def forward(self, hidden_states, *args, **kwargs):
        cache = kwargs.get("past_key_values", kwargs.get("cache", kwargs.get("past_key_value")))
        if cache is not None:
            batch, length = hidden_states.shape[:2]
            placeholder = hidden_states.new_zeros(batch, 1, length, 1)
            cache.update(placeholder, placeholder, self.layer_idx)
        out = torch.zeros_like(hidden_states)
        if self.bias is not None:
            out = out + self.bias
        return out, None


class LayerAttentionConfig:
    """The model config as one pruned attention block reads it: with its own head counts.

    Phi-3's attention splits its fused ``qkv_proj`` output at ``config.num_attention_heads *
    head_dim``, a count for the whole model; this view gives the layer's own counts and
    forwards every other attribute (attention implementation, sliding window, ...) to the
    shared config, so later changes to it are seen.
    """

    def __init__(self, config, num_attention_heads, num_key_value_heads):
        shared = config.__dict__.get("_shared_config", config)  # never a view of a view
        self.__dict__.update(
            _shared_config=shared,
            num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads,
        )

    def __getattr__(self, name):
        shared = self.__dict__.get("_shared_config")
        if shared is None:  # while copy/deepcopy rebuilds the object
            raise AttributeError(name)
        return getattr(shared, name)

    def __setattr__(self, name, value):
        if name in self.__dict__:
            self.__dict__[name] = value
        else:
            setattr(self._shared_config, name, value)


def resize_layers_to_config(model: Any) -> None:
    """Re-create q/k/v/o and gate/up/down of each layer at the sizes in ``model.config``.

    ``layer_output_bias: true`` (FLAP-style bias compensation) gives o_proj and down_proj a
    bias even where the family's ``attention_bias`` / ``mlp_bias`` would build none. A layer
    listed with 0 KV heads gets a :class:`RemovedAttention` (with a bias where o_proj had one).
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
            if n_kv_i == 0:
                w = attn.o_proj.weight
                has_bias = out_bias or attn.o_proj.bias is not None
                layer.self_attn = RemovedAttention(
                    hidden, head_dim, i, has_bias, dtype=w.dtype, device=w.device
                )
            else:
                q_out, kv_out = n_kv_i * ratio * head_dim, n_kv_i * head_dim
                if hasattr(attn, "qkv_proj"):  # Phi-3: rows [q; k; v] in one projection
                    attn.qkv_proj = _linear_like(attn.qkv_proj, hidden, q_out + 2 * kv_out)
                    attn.num_key_value_heads = n_kv_i
                    attn.config = LayerAttentionConfig(config, n_kv_i * ratio, n_kv_i)
                else:
                    attn.q_proj = _linear_like(attn.q_proj, hidden, q_out)
                    attn.k_proj = _linear_like(attn.k_proj, hidden, kv_out)
                    attn.v_proj = _linear_like(attn.v_proj, hidden, kv_out)
                attn.o_proj = _linear_like(attn.o_proj, q_out, hidden, out_bias)
        if inter is not None:
            mlp = layer.mlp
            width = int(inter[i])
            if hasattr(mlp, "gate_up_proj"):  # Phi-3: rows [gate; up] in one projection
                mlp.gate_up_proj = _linear_like(mlp.gate_up_proj, hidden, 2 * width)
            else:
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


class PrunedGemma2ForCausalLM(Gemma2ForCausalLM):
    config_class = PrunedGemma2Config

    def __init__(self, config):
        super().__init__(config)
        resize_layers_to_config(self)


class PrunedGemma3ForCausalLM(Gemma3ForCausalLM):
    config_class = PrunedGemma3Config

    def __init__(self, config):
        super().__init__(config)
        resize_layers_to_config(self)


class PrunedPhi3ForCausalLM(Phi3ForCausalLM):
    """Phi-3 / Phi-4-mini: fused ``qkv_proj`` / ``gate_up_proj`` at each layer's own size."""

    config_class = PrunedPhi3Config

    def __init__(self, config):
        super().__init__(config)
        resize_layers_to_config(self)
