"""Export a pruned (or dense) checkpoint to a GGUF file that llama.cpp runs.

llama.cpp's ``deci`` architecture (NVIDIA's heterogeneous Llama, "Nemotron-NAS") reads
per-layer arrays ``deci.attention.head_count``, ``deci.attention.head_count_kv`` and
``deci.feed_forward_length``, so every decoder layer keeps its own Q heads, KV heads and MLP
width. Its graph is the Llama block (RMSNorm, RoPE attention, SwiGLU MLP); a layer with
``head_count == 0`` skips attention (its output is its input), a layer with
``feed_forward_length == 0`` skips the MLP. Optional biases it reads: q/k/v, attention
output, and gate/up/down.

Two llama.cpp conventions shape the tensors:

* **RoPE layout.** q_proj/k_proj rows are reordered per head from Hugging Face's half-split
  layout to ggml's pairwise one (see ``gguf_rope``).
* **Per-layer corner cases.** llama.cpp takes the head size from layer 0's head count, so
  an attention-free layer 0 is written as one GQA group whose output projection is zero
  (same function, it still runs); so is a removed block that still adds a constant (its
  ``self_attn.bias``, kept as the attention output bias); and a layer with attention but no
  MLP is written with a one-channel zero MLP, because the deci graph drops a layer's
  attention output when its ``feed_forward_length`` is 0.

Output types: ``f32`` (exact), ``f16``, ``q8_0`` (matrices whose rows are not a multiple
of 32 fall back to f16). Norms, biases and ``rope_freqs`` always stay f32.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import gguf
import numpy as np
import torch

from gqa_prune.errors import GQAPruneError
from gqa_prune.export.gguf_rope import llama3_rope_factors, rope_interleave, rope_settings
from gqa_prune.export.gguf_tokenizer import read_tokenizer
from gqa_prune.export.hf_weights import CheckpointWeights

log = logging.getLogger(__name__)

OutType = Literal["f32", "f16", "q8_0"]
OUTTYPES: tuple[str, ...] = get_args(OutType)
ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DECI]
FAMILIES = ("llama", "mistral", "qwen2")
_FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
Q = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class DeciLayout:
    """Per-layer shapes as written to the GGUF file (after the corner-case fixes).

    Attributes:
        n_head / n_head_kv: Q and KV heads of each layer (0 = no attention).
        n_ff: MLP width of each layer (0 = no MLP).
        dummy_attention: layers written with a zero-output GQA group (attention-free layer 0).
        dummy_mlp: layers written with a one-channel zero MLP.
    """

    n_head: tuple[int, ...]
    n_head_kv: tuple[int, ...]
    n_ff: tuple[int, ...]
    dummy_attention: tuple[int, ...] = ()
    dummy_mlp: tuple[int, ...] = ()


@dataclass(frozen=True)
class _Tensor:
    """One tensor of the output file: its name, numpy shape, type and how to make it."""

    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    make: Callable[[], torch.Tensor]
    source: str | None = None  # checkpoint tensor it is made from

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * size


def _family(config: dict[str, Any]) -> str:
    model_type = str(config.get("model_type", ""))
    family = model_type.removeprefix("gqa_pruned_")
    if family == "qwen3":
        raise GQAPruneError(
            "Qwen3 checkpoints cannot be exported: llama.cpp's deci architecture has no "
            "q_norm/k_norm (per-head RMSNorm of queries and keys); use llama, mistral or qwen2"
        )
    if family not in FAMILIES:
        raise GQAPruneError(
            f"model_type '{model_type}' cannot be exported to GGUF; supported families: "
            f"{', '.join(FAMILIES)} (dense or gqa-prune checkpoints)"
        )
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise GQAPruneError(f"hidden_act '{act}' cannot be exported: the deci graph uses SiLU")
    if float(config.get("partial_rotary_factor", 1.0)) != 1.0:
        raise GQAPruneError("partial rotary embeddings cannot be exported: deci ropes whole heads")
    return family


def layer_layout(config: dict[str, Any], weights: CheckpointWeights) -> DeciLayout:
    """Per-layer heads and MLP widths, read from the weight shapes and checked against config.

    Raises:
        GQAPruneError: shapes that do not fit the head size, a half-removed attention block,
            or a per-layer list in ``config.json`` that disagrees with the weights.
    """
    head_dim = head_dim_of(config)
    n_layers = int(config["num_hidden_layers"])
    ratio = int(config["num_attention_heads"]) // int(
        config.get("num_key_value_heads") or config["num_attention_heads"]
    )
    n_head: list[int] = []
    n_kv: list[int] = []
    n_ff: list[int] = []
    dummy_attn: list[int] = []
    dummy_mlp: list[int] = []
    for i in range(n_layers):
        src = weights.layer(i)
        q = weights.shape(f"{src}.self_attn.q_proj.weight")
        k = weights.shape(f"{src}.self_attn.k_proj.weight")
        heads = kv = 0
        if q is not None and k is not None:
            heads, kv = q[0] // head_dim, k[0] // head_dim
            if q[0] % head_dim or k[0] % head_dim or kv == 0 or heads % kv:
                raise GQAPruneError(
                    f"layer {i}: q_proj has {q[0]} rows, k_proj {k[0]}: not whole heads of "
                    f"head_dim={head_dim} with a whole Q:KV ratio"
                )
        elif q is not None or k is not None:
            raise GQAPruneError(f"layer {i} has only part of its attention block (q or k missing)")
        gate = weights.shape(f"{src}.mlp.gate_proj.weight")
        width = 0 if gate is None else gate[0]
        # layer 0 sets llama.cpp's head size; a removed block that still adds a constant
        # (self_attn.bias) needs the attention output bias: both get one zero-weight group
        if heads == 0 and (i == 0 or weights.has(f"{src}.self_attn.bias")):
            heads, kv = ratio, 1
            dummy_attn.append(i)
        if width == 0 and (heads > 0 or weights.has(f"{src}.mlp.down_proj.bias")):
            width = 1
            dummy_mlp.append(i)
        n_head.append(heads)
        n_kv.append(kv)
        n_ff.append(width)
    layout = DeciLayout(
        tuple(n_head), tuple(n_kv), tuple(n_ff), tuple(dummy_attn), tuple(dummy_mlp)
    )
    _check_against_config(config, layout)
    return layout


def _check_against_config(config: dict[str, Any], layout: DeciLayout) -> None:
    kv = list(layout.n_head_kv)
    ff = list(layout.n_ff)
    for i in layout.dummy_attention:
        kv[i] = 0
    for i in layout.dummy_mlp:
        ff[i] = 0
    for key, found in (("layer_num_key_value_heads", kv), ("layer_intermediate_sizes", ff)):
        listed = config.get(key)
        if listed is not None and [int(v) for v in listed] != found:
            raise GQAPruneError(
                f"config.json {key}={list(listed)} disagrees with the weights ({found}); the "
                "checkpoint is inconsistent, save it again with gqa_prune.save_pruned"
            )


def head_dim_of(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def _qtype(outtype: str, shape: tuple[int, ...]) -> gguf.GGMLQuantizationType:
    if len(shape) == 1 or outtype == "f32":
        return Q.F32
    if outtype == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        return Q.Q8_0
    return Q.F16


def _encode(t: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    a = np.ascontiguousarray(t.detach().to(torch.float32).cpu().numpy())
    if qtype == Q.F32:
        return a
    if qtype == Q.F16:
        return a.astype(np.float16)
    return gguf.quants.quantize(a, qtype)


def _filled(shape: tuple[int, ...], value: float) -> Callable[[], torch.Tensor]:
    return lambda: torch.full(shape, value)


def _tensor_plan(
    config: dict[str, Any], weights: CheckpointWeights, layout: DeciLayout, outtype: str
) -> list[_Tensor]:
    """Every output tensor, in file order, with a function that produces its data."""
    head_dim = head_dim_of(config)
    hidden = int(config["hidden_size"])
    names, T = gguf.TENSOR_NAMES, gguf.MODEL_TENSOR
    plan: list[_Tensor] = []

    def add(name: str, shape: tuple[int, ...], make: Callable[[], torch.Tensor]) -> None:
        plan.append(_Tensor(name, shape, _qtype(outtype, shape), make))

    def copy(name: str, key: str, rope: bool = False, required: bool = True) -> None:
        shape = weights.shape(key)
        if shape is None:
            if required:
                raise GQAPruneError(f"the checkpoint has no tensor '{key}'")
            return

        def make() -> torch.Tensor:
            t = weights.get(key)
            return rope_interleave(t, head_dim) if rope else t

        plan.append(_Tensor(name, shape, _qtype(outtype, shape), make, key))

    copy(f"{names[T.TOKEN_EMBD]}.weight", "model.embed_tokens.weight")
    rope_cfg = rope_settings(config)
    if rope_cfg["rope_type"] == "llama3":
        factors = llama3_rope_factors(rope_cfg, head_dim)
        add(f"{names[T.ROPE_FREQS]}.weight", tuple(factors.shape), lambda: factors)
    copy(f"{names[T.OUTPUT_NORM]}.weight", "model.norm.weight")
    if not _tied(config, weights):
        copy(f"{names[T.OUTPUT]}.weight", "lm_head.weight")
    for i in range(len(layout.n_head)):
        src = weights.layer(i)
        attn, mlp = f"{src}.self_attn", f"{src}.mlp"

        def out(kind: gguf.MODEL_TENSOR, suffix: str = "weight", i: int = i) -> str:
            return f"{names[kind].format(bid=i)}.{suffix}"

        if i in layout.dummy_attention:  # zero output: the layer passes its input through
            q_rows, kv_rows = layout.n_head[i] * head_dim, layout.n_head_kv[i] * head_dim
            add(out(T.ATTN_NORM), (hidden,), _filled((hidden,), 1.0))
            for kind, shape in (
                (T.ATTN_Q, (q_rows, hidden)),
                (T.ATTN_K, (kv_rows, hidden)),
                (T.ATTN_V, (kv_rows, hidden)),
                (T.ATTN_OUT, (hidden, q_rows)),
            ):
                add(out(kind), shape, _filled(shape, 0.0))
            copy(out(T.ATTN_OUT, "bias"), f"{attn}.bias", required=False)
        elif layout.n_head[i] > 0:
            copy(out(T.ATTN_NORM), f"{src}.input_layernorm.weight")
            for kind, proj in (
                (T.ATTN_Q, "q"),
                (T.ATTN_K, "k"),
                (T.ATTN_V, "v"),
                (T.ATTN_OUT, "o"),
            ):
                rope = proj in ("q", "k")
                copy(out(kind), f"{attn}.{proj}_proj.weight", rope)
                copy(out(kind, "bias"), f"{attn}.{proj}_proj.bias", rope, required=False)
        if i in layout.dummy_mlp:  # zero output (plus the down bias, if any)
            add(out(T.FFN_NORM), (hidden,), _filled((hidden,), 1.0))
            add(out(T.FFN_GATE), (1, hidden), _filled((1, hidden), 0.0))
            add(out(T.FFN_UP), (1, hidden), _filled((1, hidden), 0.0))
            add(out(T.FFN_DOWN), (hidden, 1), _filled((hidden, 1), 0.0))
            copy(out(T.FFN_DOWN, "bias"), f"{mlp}.down_proj.bias", required=False)
        elif layout.n_ff[i] > 0:
            copy(out(T.FFN_NORM), f"{src}.post_attention_layernorm.weight")
            for kind, proj in ((T.FFN_GATE, "gate"), (T.FFN_UP, "up"), (T.FFN_DOWN, "down")):
                copy(out(kind), f"{mlp}.{proj}_proj.weight")
                copy(out(kind, "bias"), f"{mlp}.{proj}_proj.bias", required=False)
    return plan


def _tied(config: dict[str, Any], weights: CheckpointWeights) -> bool:
    tied = config.get("tie_word_embeddings")
    return not weights.has("lm_head.weight") if tied is None else bool(tied)


def _write_metadata(
    writer: gguf.GGUFWriter, config: dict[str, Any], layout: DeciLayout, outtype: str, name: str
) -> None:
    head_dim = head_dim_of(config)
    writer.add_name(name)
    writer.add_description("GQA-pruned with gqa-prune (per-layer heads and MLP widths)")
    writer.add_block_count(len(layout.n_head))
    context = int(config.get("max_position_embeddings", 4096))
    window = config.get("sliding_window")
    if window and config.get("use_sliding_window", True) and int(window) < context:
        log.warning(
            "sliding_window=%s is not supported by llama.cpp's deci graph (full attention); "
            "context_length is set to the window so both runtimes agree up to it",
            window,
        )
        context = int(window)
    writer.add_context_length(context)
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(list(layout.n_ff))
    writer.add_head_count(list(layout.n_head))
    writer.add_head_count_kv(list(layout.n_head_kv))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    rope = rope_settings(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_file_type(_FILE_TYPES[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def export_gguf(
    checkpoint_dir: str | Path,
    out_path: str | Path,
    outtype: OutType | str = "f16",
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint folder as a GGUF file for llama.cpp (``deci`` architecture).

    Args:
        checkpoint_dir: a folder written by :func:`gqa_prune.save_pruned`, or a dense
            Hugging Face Llama / Mistral / Qwen2 folder (safetensors + ``tokenizer.json``).
        out_path: the ``.gguf`` file to write (written to a temp file, then renamed).
        outtype: ``f32``, ``f16`` or ``q8_0`` for the weight matrices.
        overwrite: replace an existing ``out_path``.

    Returns:
        ``out_path``.

    Raises:
        GQAPruneError: an existing output without ``overwrite``, an unknown ``outtype``, or a
            checkpoint llama.cpp's deci architecture cannot represent (the message says what).
    """
    src, out = Path(checkpoint_dir), Path(out_path)
    if outtype not in OUTTYPES:
        raise GQAPruneError(f"--outtype '{outtype}' is not one of {', '.join(OUTTYPES)}")
    if out.exists() and not overwrite:
        raise GQAPruneError(f"{out} already exists; pass --overwrite to replace it")
    try:
        config = json.loads((src / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise GQAPruneError(f"{src} is not a model folder (no readable config.json)") from exc
    _family(config)
    weights = CheckpointWeights(src)
    layout = layer_layout(config, weights)
    plan = _tensor_plan(config, weights, layout, outtype)
    weights.check_all_used({t.source for t in plan if t.source is not None})
    vocab = read_tokenizer(src, int(config["vocab_size"]))
    for i in layout.dummy_attention:
        log.warning("layer %d has no attention: written as one zero-output GQA group", i)
    for i in layout.dummy_mlp:
        log.warning("layer %d has no MLP: written as a one-channel zero MLP", i)

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, arch=ARCH)
        _write_metadata(writer, config, layout, outtype, src.resolve().name)
        vocab.write_to(writer)
        for t in plan:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in plan:  # one tensor in memory at a time
            writer.write_tensor_data(_encode(t.make(), t.qtype))
        writer.close()
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise GQAPruneError(f"cannot write {out}: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
