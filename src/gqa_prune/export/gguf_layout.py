"""Which llama.cpp architecture a checkpoint is written as, and its per-layer shapes.

llama.cpp builds most architectures (``llama``, ``qwen2``, ``qwen3``, ...) with layer 0's
head counts and MLP width for *every* layer: it reads per-layer ``head_count`` /
``head_count_kv`` / ``feed_forward_length`` arrays, but creates each layer's tensors with
layer 0's shapes, so a pruned file fails to load (``tensor 'blk.1.attn_q.weight' has wrong
shape``). Two architectures size every layer on its own, and we use them:

* ``deci`` (NVIDIA's heterogeneous Llama) for Llama / Mistral / Qwen2: the Llama block with
  optional q/k/v, output and MLP biases. A layer with ``head_count == 0`` skips attention.
* ``openelm`` for Qwen3: the Llama block with fused QKV and per-head q/k RMSNorm (Qwen3's
  ``q_norm`` / ``k_norm``), NEOX RoPE, no biases, and the output matrix always tied to the
  token embedding. Its graph has no attention-free or MLP-free layer.

Per-layer corner cases are written as "dummy" blocks of the same function: an attention
group whose output projection is zero, or a one-channel MLP whose weights are zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from gqa_prune.errors import GQAPruneError
from gqa_prune.export.hf_weights import CheckpointWeights

Arch = Literal["deci", "openelm"]
ARCH_OF_FAMILY: dict[str, Arch] = {
    "llama": "deci",
    "mistral": "deci",
    "qwen2": "deci",
    "qwen3": "openelm",
}

# Families gqa-prune prunes but cannot export, and why (checked in the llama.cpp vendored in
# llama-cpp-python 0.3.36: src/models/gemma2.cpp, gemma3.cpp and phi3.cpp create every
# layer's tensors with ``n_head`` / ``n_head_kv`` / ``n_ff`` = ``hparams.n_head()`` etc., whose
# layer index defaults to 0, where deci.cpp reads ``hparams.n_head(i)`` per layer; gemma4.cpp
# is per-layer but applies a weightless ``ggml_rms_norm`` to V, which Gemma 2/3 do not have).
_LAYER0 = "every layer with layer 0's head counts and MLP width"
_GEMMA_WHY = (
    f"llama.cpp's gemma/gemma2/gemma3 graphs build {_LAYER0}, so a model with per-layer heads or "
    "widths cannot be loaded (its per-layer gemma4 graph RMS-normalises V, which Gemma 2/3 "
    "do not)"
)
REFUSED_FAMILIES: dict[str, str] = {
    "gemma": _GEMMA_WHY,
    "gemma2": _GEMMA_WHY,
    "gemma3": _GEMMA_WHY,
    "gemma3_text": _GEMMA_WHY,
    "phi3": f"llama.cpp's phi3 graph builds {_LAYER0}, and this export does not split "
    "Phi-3's fused qkv_proj / gate_up_proj into the per-layer deci layout",
}


@dataclass(frozen=True)
class LayerLayout:
    """Per-layer shapes as written to the GGUF file (after the corner-case fixes).

    Attributes:
        arch: llama.cpp architecture of the file.
        n_head / n_head_kv: Q and KV heads of each layer (0 = no attention).
        n_ff: MLP width of each layer (0 = no MLP).
        dummy_attention: layers written with a zero-output GQA group.
        dummy_mlp: layers written with a one-channel zero MLP.
    """

    arch: Arch
    n_head: tuple[int, ...]
    n_head_kv: tuple[int, ...]
    n_ff: tuple[int, ...]
    dummy_attention: tuple[int, ...] = ()
    dummy_mlp: tuple[int, ...] = ()


def export_arch(config: dict[str, Any], weights: CheckpointWeights) -> Arch:
    """The llama.cpp architecture for this checkpoint, or why there is none.

    Raises:
        GQAPruneError: an unknown or refused family (Gemma, Phi-3), a non-SiLU MLP, partial
            rotary embeddings, or a Qwen3 checkpoint the ``openelm`` graph cannot hold
            (untied output, biases).
    """
    model_type = str(config.get("model_type", ""))
    family = model_type.removeprefix("gqa_pruned_")
    if family in REFUSED_FAMILIES:
        raise GQAPruneError(
            f"model_type '{model_type}' cannot be exported to GGUF: {REFUSED_FAMILIES[family]}; "
            f"exportable families: {', '.join(ARCH_OF_FAMILY)}"
        )
    if family not in ARCH_OF_FAMILY:
        raise GQAPruneError(
            f"model_type '{model_type}' cannot be exported to GGUF; supported families: "
            f"{', '.join(ARCH_OF_FAMILY)} (dense or gqa-prune checkpoints)"
        )
    arch = ARCH_OF_FAMILY[family]
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise GQAPruneError(f"hidden_act '{act}' cannot be exported: the {arch} graph uses SiLU")
    if float(config.get("partial_rotary_factor", 1.0)) != 1.0:
        raise GQAPruneError(
            f"partial rotary embeddings cannot be exported: {arch} ropes whole heads"
        )
    if arch == "openelm":
        _check_openelm(config, weights)
    return arch


def _check_openelm(config: dict[str, Any], weights: CheckpointWeights) -> None:
    why = (
        "llama.cpp's qwen3 architecture builds every layer with layer 0's head counts and MLP "
        "width, and its openelm architecture (per-layer heads and widths with q/k norms, used "
        "here for Qwen3) "
    )
    if not tied_embeddings(config, weights):
        raise GQAPruneError(
            "Qwen3 with an untied lm_head (tie_word_embeddings false, e.g. Qwen3-8B and larger) "
            f"cannot be exported: {why}always uses token_embd as the output matrix"
        )
    biases = [k for k in weights.names() if k.endswith("bias")]
    if biases:
        raise GQAPruneError(
            f"Qwen3 with biases (e.g. '{biases[0]}', from attention_bias or --compensation "
            f"bias) cannot be exported: {why}has no bias tensors; prune with another "
            "--compensation"
        )


def tied_embeddings(config: dict[str, Any], weights: CheckpointWeights) -> bool:
    tied = config.get("tie_word_embeddings")
    return not weights.has("lm_head.weight") if tied is None else bool(tied)


def head_dim_of(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def layer_layout(config: dict[str, Any], weights: CheckpointWeights, arch: Arch) -> LayerLayout:
    """Per-layer heads and MLP widths, read from the weight shapes and checked against config.

    Raises:
        GQAPruneError: shapes that do not fit the head size, a half-removed attention block,
            or a per-layer list in ``config.json`` that disagrees with the weights.
    """
    head_dim = head_dim_of(config)
    ratio = int(config["num_attention_heads"]) // int(
        config.get("num_key_value_heads") or config["num_attention_heads"]
    )
    n_head: list[int] = []
    n_kv: list[int] = []
    n_ff: list[int] = []
    dummy_attn: list[int] = []
    dummy_mlp: list[int] = []
    for i in range(int(config["num_hidden_layers"])):
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
        # deci: layer 0 sets llama.cpp's head size, and a removed block that still adds a
        # constant (self_attn.bias) needs the attention output bias; openelm: every layer
        # runs attention. These get one GQA group with zero weights.
        if heads == 0 and (arch == "openelm" or i == 0 or weights.has(f"{src}.self_attn.bias")):
            heads, kv = ratio, 1
            dummy_attn.append(i)
        # deci drops a layer's attention output when its MLP width is 0; openelm always
        # runs the MLP
        if width == 0 and (
            arch == "openelm" or heads > 0 or weights.has(f"{src}.mlp.down_proj.bias")
        ):
            width = 1
            dummy_mlp.append(i)
        n_head.append(heads)
        n_kv.append(kv)
        n_ff.append(width)
    layout = LayerLayout(
        arch, tuple(n_head), tuple(n_kv), tuple(n_ff), tuple(dummy_attn), tuple(dummy_mlp)
    )
    _check_against_config(config, layout)
    return layout


def _check_against_config(config: dict[str, Any], layout: LayerLayout) -> None:
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
