"""Architecture adapters: the ONLY place that knows module and config attribute names.

Supporting a new family means adding one entry to ``ADAPTERS``. Everything else in
gqa-prune reaches decoder layers, projections and config fields through here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gqa_prune.errors import GQAPruneError
from gqa_prune.models.fused import SplitLinear
from gqa_prune.models.geometry import GQAGeometry, count_params, heads_from_config


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Names of the modules gqa-prune reads and slices in one model family.

    Attributes:
        family: short family name (``llama``, ``qwen2`` ...).
        pruned_model_type: ``model_type`` written into a pruned checkpoint's config.
        pruned_class: class name in the shipped modeling file for that family.
        final_logit_softcap_field: config field of the final-logit soft-cap ``c``, applied by
            the model as ``logits = c * tanh(logits / c)`` (Gemma 2/3); None = no such field.
        fused_qkv / fused_gate_up: a projection holding the q/k/v (gate/up) rows stacked
            (Phi-3's ``qkv_proj`` / ``gate_up_proj``). On first access it is split into a
            :class:`~gqa_prune.models.fused.SplitLinear` whose parts ``q_name`` & co. name
            (``qkv_proj.q_proj``); it computes the same and saves fused. None = not fused.
        attention_heads_from_config: the attention forward reads its query-head count from
            ``config.num_attention_heads`` (Phi-3), so a sliced block gets its own config view.
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
    final_logit_softcap_field: str | None = None
    fused_qkv: str | None = None
    fused_gate_up: str | None = None
    attention_heads_from_config: bool = False

    # ----------------------------------------------------------------- access
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layer list (``model.model.layers`` for Llama-like models).

        Fused projections of every layer are split first (:meth:`split_fused_`).
        """
        layers = self._path(model, self.layers_attr)
        if self.fused_qkv or self.fused_gate_up:
            for layer in layers:
                self.split_fused_(layer)
        return layers

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The norm applied after the last decoder layer (``model.model.norm``)."""
        return self._path(model, self.final_norm_attr)

    def final_logit_softcap(self, model: nn.Module) -> float | None:
        """The ``c`` of ``logits = c * tanh(logits / c)`` after the LM head; None = none."""
        if self.final_logit_softcap_field is None:
            return None
        cap = getattr(getattr(model, "config", None), self.final_logit_softcap_field, None)
        return float(cap) if cap else None

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
        self.split_fused_(layer)
        return tuple(
            self._linear(attn, n) for n in (self.q_name, self.k_name, self.v_name, self.o_name)
        )

    def mlp_projections(self, layer: nn.Module) -> tuple[nn.Linear, ...]:
        """``(gate_proj, up_proj, down_proj)`` of one decoder layer."""
        mlp = self.mlp(layer)
        self.split_fused_(layer)
        return tuple(self._linear(mlp, n) for n in (self.gate_name, self.up_name, self.down_name))

    def split_fused_(self, layer: nn.Module) -> None:
        """Split the layer's fused projections into their parts, in place (idempotent).

        ``qkv_proj`` rows are ``[q (n_q*d); k (n_kv*d); v (n_kv*d)]`` with ``n_kv`` and ``d``
        read from the attention block (per layer in a pruned model); ``gate_up_proj`` rows
        are two equal halves ``[gate; up]``. A no-op for families without fused projections.
        """
        attn: Any = getattr(layer, self.attn_attr, None)
        if self.fused_qkv and isinstance(getattr(attn, self.fused_qkv, None), nn.Linear):
            kv = int(attn.num_key_value_heads) * int(attn.head_dim)
            q = getattr(attn, self.fused_qkv).out_features - 2 * kv
            self._split_(attn, self.fused_qkv, (self.q_name, self.k_name, self.v_name), (q, kv, kv))
        mlp: Any = getattr(layer, self.mlp_attr, None)
        if self.fused_gate_up and isinstance(getattr(mlp, self.fused_gate_up, None), nn.Linear):
            half = getattr(mlp, self.fused_gate_up).out_features // 2
            self._split_(mlp, self.fused_gate_up, (self.gate_name, self.up_name), (half, half))

    def _split_(
        self, block: nn.Module, fused: str, names: tuple[str, ...], rows: tuple[int, ...]
    ) -> None:
        parts = {n.rpartition(".")[2]: r for n, r in zip(names, rows, strict=True)}
        try:
            setattr(block, fused, SplitLinear.split(getattr(block, fused), parts))
        except ValueError as exc:
            raise GQAPruneError(f"cannot split {self.family}'s {fused}: {exc}") from exc

    def set_head_counts_(self, attn: Any, n_q: int, n_kv: int) -> None:
        """Record a sliced attention block's head counts where its forward reads them."""
        for name in ("num_heads", "num_attention_heads"):
            if isinstance(getattr(attn, name, None), int):
                setattr(attn, name, n_q)
        if isinstance(getattr(attn, "num_key_value_heads", None), int):
            attn.num_key_value_heads = n_kv
        if self.attention_heads_from_config:
            from gqa_prune.models.remote.modeling_gqa_pruned import LayerAttentionConfig

            attn.config = LayerAttentionConfig(attn.config, n_q, n_kv)

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

    @contextmanager
    def blocks_replaced(
        self, layer: nn.Module, attention: nn.Module | None = None, mlp: nn.Module | None = None
    ) -> Iterator[None]:
        """Inside the block, the layer's attention and / or MLP block are the given modules
        (None = unchanged); the originals are back afterwards, also on an exception."""
        saved = []
        for attr, module in ((self.attn_attr, attention), (self.mlp_attr, mlp)):
            if module is not None:
                saved.append((attr, self._child(layer, attr, "block")))
                setattr(layer, attr, module)
        try:
            yield
        finally:
            for attr, original in saved:
                setattr(layer, attr, original)

    def _child(self, module: nn.Module, name: str, what: str) -> nn.Module:
        child = getattr(module, name, None)
        if child is None:
            raise GQAPruneError(
                f"decoder layer {type(module).__name__} has no {what} '{name}'; "
                f"gqa-prune supports {supported_families()}"
            )
        return child

    def _linear(self, module: nn.Module, name: str) -> nn.Linear:
        proj: Any = module
        for part in name.split("."):  # a dotted name reaches a part of a fused projection
            proj = getattr(proj, part, None)
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
        total, embedding = count_params(model)  # tied weights count once
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
            embedding_params=embedding,
        )


def is_removed_attention(module: nn.Module) -> bool:
    """True for the stand-in of an attention block that pruning removed entirely."""
    return bool(getattr(module, "is_removed_attention", False))


def _family(name: str, **fields: Any) -> ArchitectureAdapter:
    cls = name.capitalize()
    return ArchitectureAdapter(
        family=name,
        pruned_model_type=f"gqa_pruned_{name}",
        pruned_class=f"Pruned{cls}ForCausalLM",
        pruned_config_class=f"Pruned{cls}Config",
        **fields,
    )


# model_type (as in config.json) -> adapter. Pruned checkpoints map back to their family.
ADAPTERS: dict[str, ArchitectureAdapter] = {}
for _name in ("llama", "mistral", "qwen2", "qwen3"):
    ADAPTERS[_name] = _family(_name)
    ADAPTERS[f"gqa_pruned_{_name}"] = ADAPTERS[_name]
# Gemma 2 / Gemma 3 text (Gemma3ForCausalLM, model_type "gemma3_text", also what a Gemma 3
# GGUF loads as): same module names as Llama. Sandwich norms (post_attention_layernorm /
# post_feedforward_layernorm run on o_proj / down_proj outputs before the residual add),
# q/k norms per head (Gemma 3) and attention soft-capping (Gemma 2) all act per head or
# after the projections, so slicing whole groups and channels is unchanged; only the final
# soft-cap sits outside the modules that layer importance runs.
for _model_type, _name in (("gemma2", "gemma2"), ("gemma3_text", "gemma3")):
    ADAPTERS[_model_type] = _family(_name, final_logit_softcap_field="final_logit_softcapping")
    ADAPTERS[f"gqa_pruned_{_name}"] = ADAPTERS[_model_type]
# Phi-3 / Phi-4-mini (Phi3ForCausalLM): Llama-like, but q/k/v rows are stacked in one
# qkv_proj and gate/up rows in one gate_up_proj, and the attention splits its fused output
# at config.num_attention_heads * head_dim (a global count, hence per-layer config views).
ADAPTERS["phi3"] = ADAPTERS["gqa_pruned_phi3"] = _family(
    "phi3",
    fused_qkv="qkv_proj",
    q_name="qkv_proj.q_proj",
    k_name="qkv_proj.k_proj",
    v_name="qkv_proj.v_proj",
    fused_gate_up="gate_up_proj",
    gate_name="gate_up_proj.gate_proj",
    up_name="gate_up_proj.up_proj",
    attention_heads_from_config=True,
)


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
