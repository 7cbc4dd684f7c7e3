"""The tensors of a GGUF file: names, shapes, types, and how each is made from the checkpoint.

``deci`` uses ggml's "normal" RoPE (pairwise), so q_proj/k_proj rows are reordered per
head (``gguf_rope``); ``openelm`` uses NEOX RoPE, which rotates the same ``(j, j + d/2)``
pairs as Hugging Face, so its fused QKV matrix is q, k and v stacked as they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np
import torch

from gqa_prune.errors import GQAPruneError
from gqa_prune.export.gguf_layout import LayerLayout, head_dim_of, tied_embeddings
from gqa_prune.export.gguf_rope import llama3_rope_factors, rope_interleave, rope_settings
from gqa_prune.export.hf_weights import CheckpointWeights

Q = gguf.GGMLQuantizationType
NAMES, T = gguf.TENSOR_NAMES, gguf.MODEL_TENSOR


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the output file: its name, numpy shape, type and how to make it."""

    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    make: Callable[[], torch.Tensor]
    sources: tuple[str, ...] = ()  # checkpoint tensors it is made from

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * size


def qtype_for(outtype: str, shape: tuple[int, ...]) -> gguf.GGMLQuantizationType:
    if len(shape) == 1 or outtype == "f32":
        return Q.F32
    if outtype == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        return Q.Q8_0
    return Q.F16


def encode(t: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    a = np.ascontiguousarray(t.detach().to(torch.float32).cpu().numpy())
    if qtype == Q.F32:
        return a
    if qtype == Q.F16:
        return a.astype(np.float16)
    return gguf.quants.quantize(a, qtype)


def _filled(shape: tuple[int, ...], value: float) -> Callable[[], torch.Tensor]:
    return lambda: torch.full(shape, value)


def _name(kind: gguf.MODEL_TENSOR, i: int | None = None, suffix: str = "weight") -> str:
    base = NAMES[kind] if i is None else NAMES[kind].format(bid=i)
    return f"{base}.{suffix}"


class _Plan:
    """Collects the tensors of one file in order."""

    def __init__(self, weights: CheckpointWeights, outtype: str) -> None:
        self.weights, self.outtype = weights, outtype
        self.tensors: list[GGUFTensor] = []

    def add(self, name: str, shape: tuple[int, ...], make: Callable[[], torch.Tensor]) -> None:
        self.tensors.append(GGUFTensor(name, shape, qtype_for(self.outtype, shape), make))

    def zeros(self, name: str, shape: tuple[int, ...]) -> None:
        self.add(name, shape, _filled(shape, 0.0))

    def ones(self, name: str, shape: tuple[int, ...]) -> None:
        self.add(name, shape, _filled(shape, 1.0))

    def copy(
        self,
        name: str,
        key: str,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        required: bool = True,
    ) -> None:
        shape = self.weights.shape(key)
        if shape is None:
            if required:
                raise GQAPruneError(f"the checkpoint has no tensor '{key}'")
            return

        def make() -> torch.Tensor:
            t = self.weights.get(key)
            return transform(t) if transform else t

        qtype = qtype_for(self.outtype, shape)
        self.tensors.append(GGUFTensor(name, shape, qtype, make, (key,)))

    def stack(self, name: str, keys: list[str]) -> None:
        """Rows of several checkpoint matrices, one after the other (fused QKV)."""
        shapes = [s for k in keys if (s := self.weights.shape(k)) is not None]
        if len(shapes) != len(keys):
            raise GQAPruneError(f"the checkpoint lacks one of {keys}")
        shape = (sum(s[0] for s in shapes), *shapes[0][1:])

        def make() -> torch.Tensor:
            return torch.cat([self.weights.get(k) for k in keys])

        qtype = qtype_for(self.outtype, shape)
        self.tensors.append(GGUFTensor(name, shape, qtype, make, tuple(keys)))

    def mlp(self, i: int, layout: LayerLayout, hidden: int, biases: bool) -> None:
        mlp = f"{self.weights.layer(i)}.mlp"
        if i in layout.dummy_mlp:  # zero output (plus the down bias, if any)
            self.ones(_name(T.FFN_NORM, i), (hidden,))
            self.zeros(_name(T.FFN_GATE, i), (1, hidden))
            self.zeros(_name(T.FFN_UP, i), (1, hidden))
            self.zeros(_name(T.FFN_DOWN, i), (hidden, 1))
            if biases:
                self.copy(_name(T.FFN_DOWN, i, "bias"), f"{mlp}.down_proj.bias", required=False)
        elif layout.n_ff[i] > 0:
            self.copy(
                _name(T.FFN_NORM, i), f"{self.weights.layer(i)}.post_attention_layernorm.weight"
            )
            for kind, proj in ((T.FFN_GATE, "gate"), (T.FFN_UP, "up"), (T.FFN_DOWN, "down")):
                self.copy(_name(kind, i), f"{mlp}.{proj}_proj.weight")
                if biases:
                    self.copy(_name(kind, i, "bias"), f"{mlp}.{proj}_proj.bias", required=False)


def tensor_plan(
    config: dict[str, Any], weights: CheckpointWeights, layout: LayerLayout, outtype: str
) -> list[GGUFTensor]:
    """Every output tensor of the file, in file order, with a function that makes its data."""
    plan = _Plan(weights, outtype)
    plan.copy(_name(T.TOKEN_EMBD), "model.embed_tokens.weight")
    if layout.arch == "deci":
        _deci_tensors(plan, config, layout)
    else:
        _openelm_tensors(plan, config, layout)
    return plan.tensors


def _deci_tensors(plan: _Plan, config: dict[str, Any], layout: LayerLayout) -> None:
    head_dim, hidden = head_dim_of(config), int(config["hidden_size"])
    weights = plan.weights
    rope = rope_settings(config)
    if rope["rope_type"] == "llama3":
        factors = llama3_rope_factors(rope, head_dim)
        plan.add(_name(T.ROPE_FREQS), tuple(factors.shape), lambda: factors)
    plan.copy(_name(T.OUTPUT_NORM), "model.norm.weight")
    if not tied_embeddings(config, weights):
        plan.copy(_name(T.OUTPUT), "lm_head.weight")

    def pairwise(t: torch.Tensor) -> torch.Tensor:
        return rope_interleave(t, head_dim)

    for i in range(len(layout.n_head)):
        src = weights.layer(i)
        attn = f"{src}.self_attn"
        if i in layout.dummy_attention:  # zero output: the layer passes its input through
            q_rows, kv_rows = layout.n_head[i] * head_dim, layout.n_head_kv[i] * head_dim
            plan.ones(_name(T.ATTN_NORM, i), (hidden,))
            plan.zeros(_name(T.ATTN_Q, i), (q_rows, hidden))
            plan.zeros(_name(T.ATTN_K, i), (kv_rows, hidden))
            plan.zeros(_name(T.ATTN_V, i), (kv_rows, hidden))
            plan.zeros(_name(T.ATTN_OUT, i), (hidden, q_rows))
            plan.copy(_name(T.ATTN_OUT, i, "bias"), f"{attn}.bias", required=False)
        elif layout.n_head[i] > 0:
            plan.copy(_name(T.ATTN_NORM, i), f"{src}.input_layernorm.weight")
            for kind, proj in (
                (T.ATTN_Q, "q"),
                (T.ATTN_K, "k"),
                (T.ATTN_V, "v"),
                (T.ATTN_OUT, "o"),
            ):
                rope_rows = pairwise if proj in ("q", "k") else None
                plan.copy(_name(kind, i), f"{attn}.{proj}_proj.weight", rope_rows)
                plan.copy(_name(kind, i, "bias"), f"{attn}.{proj}_proj.bias", rope_rows, False)
        plan.mlp(i, layout, hidden, biases=True)


def _openelm_tensors(plan: _Plan, config: dict[str, Any], layout: LayerLayout) -> None:
    head_dim, hidden = head_dim_of(config), int(config["hidden_size"])
    weights = plan.weights
    if rope_settings(config)["rope_type"] == "llama3":
        raise GQAPruneError("llama3 RoPE scaling cannot be exported to openelm (no rope_freqs)")
    plan.copy(_name(T.OUTPUT_NORM), "model.norm.weight")  # output: token_embd (tied)
    for i in range(len(layout.n_head)):
        src = weights.layer(i)
        attn = f"{src}.self_attn"
        if i in layout.dummy_attention:  # zero q, k, v and output: adds nothing
            rows = (layout.n_head[i] + 2 * layout.n_head_kv[i]) * head_dim
            plan.ones(_name(T.ATTN_NORM, i), (hidden,))
            plan.zeros(_name(T.ATTN_QKV, i), (rows, hidden))
            plan.ones(_name(T.ATTN_Q_NORM, i), (head_dim,))
            plan.ones(_name(T.ATTN_K_NORM, i), (head_dim,))
            plan.zeros(_name(T.ATTN_OUT, i), (hidden, layout.n_head[i] * head_dim))
        else:
            plan.copy(_name(T.ATTN_NORM, i), f"{src}.input_layernorm.weight")
            plan.stack(_name(T.ATTN_QKV, i), [f"{attn}.{p}_proj.weight" for p in "qkv"])
            plan.copy(_name(T.ATTN_Q_NORM, i), f"{attn}.q_norm.weight")
            plan.copy(_name(T.ATTN_K_NORM, i), f"{attn}.k_norm.weight")
            plan.copy(_name(T.ATTN_OUT, i), f"{attn}.o_proj.weight")
        plan.mlp(i, layout, hidden, biases=False)
