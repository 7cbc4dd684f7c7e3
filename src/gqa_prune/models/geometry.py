"""GQA geometry of a decoder model, read from its config (never from constants).

One GQA *group* is one KV head together with the ``r = num_heads // num_kv_heads``
query heads that read it (query head ``h`` reads KV head ``h // r``, as in
``repeat_kv``)::

    q heads:  [q0 q1 q2] [q3 q4 q5] [q6 q7 q8]      r = 3
    kv heads:    k0/v0      k1/v1      k2/v2
    group:         0          1          2
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gqa_prune.errors import GQAPruneError


@dataclass(frozen=True)
class GQAGeometry:
    """Shapes of a (possibly already pruned) decoder.

    Attributes:
        num_layers: number of decoder layers.
        hidden_size: residual width.
        head_dim: width of one attention head.
        queries_per_kv: Q heads per KV head (the GQA ratio r; 1 for MHA).
        kv_heads: KV heads per layer (0 means the attention block was removed).
        intermediate_sizes: MLP width per layer.
        attention_bias: q/k/v projections carry biases (Qwen2 style).
        o_bias: o_proj carries a bias.
        mlp_bias: gate/up/down carry biases.
        total_params: all parameters of the model (embeddings included, tied ones once).
        embedding_params: the input embedding plus an untied LM head (a tied one counts
            once, as embedding); the rest of ``total_params`` is the transformer body.
    """

    num_layers: int
    hidden_size: int
    head_dim: int
    queries_per_kv: int
    kv_heads: tuple[int, ...]
    intermediate_sizes: tuple[int, ...]
    attention_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    total_params: int = 0
    embedding_params: int = 0

    @property
    def q_heads(self) -> tuple[int, ...]:
        """Query heads per layer."""
        return tuple(k * self.queries_per_kv for k in self.kv_heads)

    @property
    def params_per_group(self) -> int:
        """Parameters removed with one GQA group: r q rows + k row + v row + r o columns."""
        r, d, h = self.queries_per_kv, self.head_dim, self.hidden_size
        n = (2 * r + 2) * d * h
        if self.attention_bias:
            n += (r + 2) * d
        return n

    @property
    def params_per_channel(self) -> int:
        """Parameters removed with one MLP channel: a gate row, an up row, a down column."""
        n = 3 * self.hidden_size
        if self.mlp_bias:
            n += 2
        return n

    def attention_params(self, layer: int) -> int:
        """Prunable attention parameters of one layer (the o_proj bias is not prunable)."""
        return self.kv_heads[layer] * self.params_per_group

    def mlp_params(self, layer: int) -> int:
        """Prunable MLP parameters of one layer."""
        return self.intermediate_sizes[layer] * self.params_per_channel

    @property
    def prunable_params(self) -> int:
        """Attention + MLP parameters that pruning can remove."""
        return sum(self.attention_params(i) + self.mlp_params(i) for i in range(self.num_layers))

    @property
    def non_embedding_params(self) -> int:
        """Parameters of the transformer body (attention, MLP, norms): total - embedding."""
        return self.total_params - self.embedding_params

    def basis_params(self, basis: str) -> int:
        """The parameter count a pruning ratio is measured on.

        Args:
            basis: ``total`` (every parameter) or ``non_embedding`` (the transformer body).
        """
        if basis == "total":
            return self.total_params
        if basis == "non_embedding":
            return self.non_embedding_params
        raise GQAPruneError(f"unknown ratio basis '{basis}'; choose total or non_embedding")


def count_params(model: Any) -> tuple[int, int]:
    """``(total, embedding)`` parameter counts of a Hugging Face causal LM.

    Embedding = the parameters of ``get_input_embeddings()`` and ``get_output_embeddings()``
    (the LM head); a tied head shares its weight with the input embedding and counts once.
    Works on meta/offloaded parameters too (only shapes are read).
    """
    total = sum(p.numel() for p in model.parameters())  # shared (tied) tensors count once
    embedding: dict[int, int] = {}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is not None:
            embedding.update((id(p), p.numel()) for p in module.parameters())
    return total, sum(embedding.values())


def _get(config: Any, name: str) -> Any:
    value = getattr(config, name, None)
    if value is None:
        raise GQAPruneError(
            f"model config has no '{name}'; gqa-prune needs a decoder config with "
            "hidden_size, num_attention_heads, num_key_value_heads, intermediate_size"
        )
    return value


def heads_from_config(config: Any) -> tuple[int, int, int]:
    """Return ``(num_q_heads, num_kv_heads, head_dim)`` of the *unpruned* config.

    ``head_dim`` is ``config.head_dim`` when set, else ``hidden_size // num_attention_heads``.
    """
    hidden = int(_get(config, "hidden_size"))
    n_q = int(_get(config, "num_attention_heads"))
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_q)
    if n_kv <= 0 or n_q % n_kv != 0:
        raise GQAPruneError(
            f"num_attention_heads={n_q} is not a multiple of num_key_value_heads={n_kv}; "
            "GQA pruning needs whole groups of query heads per KV head"
        )
    head_dim = int(getattr(config, "head_dim", None) or hidden // n_q)
    return n_q, n_kv, head_dim


def update_config_(config: object, geometry: GQAGeometry) -> None:
    """Write per-layer head counts and MLP sizes (and an explicit head_dim) into a config.

    These are the fields the shipped modeling code reads to rebuild a pruned model
    (``layer_num_key_value_heads``, ``layer_intermediate_sizes``, ``head_dim``).
    """
    config.head_dim = geometry.head_dim  # type: ignore[attr-defined]
    config.layer_num_key_value_heads = list(geometry.kv_heads)  # type: ignore[attr-defined]
    config.layer_intermediate_sizes = list(geometry.intermediate_sizes)  # type: ignore[attr-defined]
