"""Architecture adapters: the ONLY place that knows module and config attribute names.

Supporting a new family means adding one entry to ``ADAPTERS``. Everything else in
gqa-prune reaches decoder layers, projections and config fields through here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gqa_prune.errors import GQAPruneError
from gqa_prune.models.geometry import GQAGeometry, heads_from_config


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Names of the modules gqa-prune reads and slices in one model family.

    Attributes:
        family: short family name (``llama``, ``qwen2`` ...).
        pruned_model_type: ``model_type`` written into a pruned checkpoint's config.
        pruned_class: class name in the shipped modeling file for that family.
        q_bias: q/k/v projections carry biases by construction (Qwen2).
    """

    family: str
    pruned_model_type: str
    pruned_class: str
    pruned_config_class: str
    layers_attr: str = "model.layers"
    final_norm_attr: str = "model.norm"
    attn_attr: str = "self_attn"
    mlp_attr: str = "mlp"
    q_name: str = "q_proj"
    k_name: str = "k_proj"
    v_name: str = "v_proj"
    o_name: str = "o_proj"
    gate_name: str = "gate_proj"
    up_name: str = "up_proj"
    down_name: str = "down_proj"

    # ----------------------------------------------------------------- access
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layer list (``model.model.layers`` for Llama-like models)."""
        return self._path(model, self.layers_attr)

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The norm applied after the last decoder layer (``model.model.norm``)."""
        return self._path(model, self.final_norm_attr)

    def _path(self, model: nn.Module, path: str) -> Any:
        obj: Any = model
        for part in path.split("."):
            if getattr(obj, part, None) is None:
                raise GQAPruneError(
                    f"{type(model).__name__} has no '{path}'; expected a "
                    f"{self.family}-style causal LM (e.g. AutoModelForCausalLM)"
                )
            obj = getattr(obj, part)
        return obj

    def attention(self, layer: nn.Module) -> Any:
        return self._child(layer, self.attn_attr, "attention block")

    def mlp(self, layer: nn.Module) -> Any:
        return self._child(layer, self.mlp_attr, "MLP block")

    def attention_projections(self, layer: nn.Module) -> tuple[nn.Linear, ...]:
        """``(q_proj, k_proj, v_proj, o_proj)`` of one decoder layer.

        Raises:
            GQAPruneError: the layer's attention block was removed (check ``has_attention``).
        """
        attn = self.attention(layer)
        if is_removed_attention(attn):
            raise GQAPruneError(
                f"the attention block of this {type(layer).__name__} was removed by pruning; "
                "it has no q/k/v/o projections"
            )
        return tuple(
            self._linear(attn, n) for n in (self.q_name, self.k_name, self.v_name, self.o_name)
        )

    def mlp_projections(self, layer: nn.Module) -> tuple[nn.Linear, ...]:
        """``(gate_proj, up_proj, down_proj)`` of one decoder layer."""
        mlp = self.mlp(layer)
        return tuple(self._linear(mlp, n) for n in (self.gate_name, self.up_name, self.down_name))

    def has_attention(self, layer: nn.Module) -> bool:
        """False when the layer's attention block was removed entirely by pruning."""
        attn = getattr(layer, self.attn_attr, None)
        return attn is not None and not is_removed_attention(attn)

    def prunable_projections(self, layer: nn.Module) -> tuple[nn.Linear, ...]:
        """q/k/v/o (unless the attention was removed) followed by gate/up/down."""
        attn = self.attention_projections(layer) if self.has_attention(layer) else ()
        return (*attn, *self.mlp_projections(layer))

    def remove_attention_(self, layer: nn.Module, bias: torch.Tensor | None = None) -> None:
        """Replace the layer's attention block by a :class:`RemovedAttention`, in place.

        Args:
            layer: a decoder layer.
            bias: the constant the removed block still adds (the old o_proj bias, shape
                ``(hidden_size,)``); None = nothing.
        """
        from gqa_prune.models.remote.modeling_gqa_pruned import RemovedAttention

        attn = self.attention(layer)
        o = self.attention_projections(layer)[3]
        removed = RemovedAttention(
            o.out_features,
            int(attn.head_dim),
            getattr(attn, "layer_idx", None),
            bias=bias is not None,
            dtype=o.weight.dtype,
            device=o.weight.device,
        )
        if bias is not None and removed.bias is not None:
            removed.bias.data.copy_(bias)
            removed.bias.requires_grad_(o.weight.requires_grad)
        setattr(layer, self.attn_attr, removed)

    def _child(self, module: nn.Module, name: str, what: str) -> nn.Module:
        child = getattr(module, name, None)
        if child is None:
            raise GQAPruneError(
                f"decoder layer {type(module).__name__} has no {what} '{name}'; "
                f"gqa-prune supports {supported_families()}"
            )
        return child

    def _linear(self, module: nn.Module, name: str) -> nn.Linear:
        proj = getattr(module, name, None)
        if not isinstance(proj, nn.Linear):
            raise GQAPruneError(
                f"{type(module).__name__} has no linear projection '{name}' (GQA pruning "
                f"needs q/k/v/o_proj and gate/up/down_proj); supported: {supported_families()}"
            )
        return proj

    # --------------------------------------------------------------- geometry
    def geometry(self, model: nn.Module) -> GQAGeometry:
        """Current per-layer shapes of ``model``, read from its modules and config."""
        hf_model: Any = model  # a PreTrainedModel: nn.Module does not declare .config
        config = hf_model.config
        n_q, n_kv, head_dim = heads_from_config(config)
        layers = self.decoder_layers(model)
        kv_heads, inter = [], []
        q_bias = o_bias = mlp_bias = False
        for layer in layers:
            gate, up, down = self.mlp_projections(layer)
            inter.append(gate.out_features)
            mlp_bias |= gate.bias is not None
            if not self.has_attention(layer):
                kv_heads.append(0)
                continue
            q, k, v, o = self.attention_projections(layer)
            if k.out_features % head_dim or q.out_features != k.out_features * (n_q // n_kv):
                raise GQAPruneError(
                    f"layer shapes q={q.out_features}, k={k.out_features} do not match "
                    f"head_dim={head_dim} and Q:KV={n_q // n_kv} from the config"
                )
            kv_heads.append(k.out_features // head_dim)
            q_bias |= q.bias is not None
            o_bias |= o.bias is not None
        total = sum(p.numel() for p in model.parameters())  # tied weights count once
        return GQAGeometry(
            num_layers=len(layers),
            hidden_size=int(config.hidden_size),
            head_dim=head_dim,
            queries_per_kv=n_q // n_kv,
            kv_heads=tuple(kv_heads),
            intermediate_sizes=tuple(inter),
            attention_bias=q_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            total_params=total,
        )


def is_removed_attention(module: nn.Module) -> bool:
    """True for the stand-in of an attention block that pruning removed entirely."""
    return bool(getattr(module, "is_removed_attention", False))


def _family(name: str) -> ArchitectureAdapter:
    cls = name.capitalize()
    return ArchitectureAdapter(
        family=name,
        pruned_model_type=f"gqa_pruned_{name}",
        pruned_class=f"Pruned{cls}ForCausalLM",
        pruned_config_class=f"Pruned{cls}Config",
    )


# model_type (as in config.json) -> adapter. Pruned checkpoints map back to their family.
ADAPTERS: dict[str, ArchitectureAdapter] = {}
for _name in ("llama", "mistral", "qwen2", "qwen3"):
    ADAPTERS[_name] = _family(_name)
    ADAPTERS[f"gqa_pruned_{_name}"] = ADAPTERS[_name]


def supported_families() -> str:
    return ", ".join(sorted({a.family for a in ADAPTERS.values()}))


def get_adapter(model_or_config: Any) -> ArchitectureAdapter:
    """The adapter for a model, its config, or a ``model_type`` string."""
    if isinstance(model_or_config, str):
        model_type: str | None = model_or_config
    else:
        config = getattr(model_or_config, "config", model_or_config)
        model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise GQAPruneError(
            f"model family '{model_type}' is not supported; supported families: "
            f"{supported_families()}"
        )
    return ADAPTERS[model_type]
