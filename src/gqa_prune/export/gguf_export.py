"""Export a pruned (or dense) checkpoint to a GGUF file that llama.cpp runs.

Every decoder layer keeps its own Q heads, KV heads and MLP width: the file uses a llama.cpp
architecture that reads per-layer arrays ``{arch}.attention.head_count``,
``{arch}.attention.head_count_kv`` and ``{arch}.feed_forward_length`` *and* sizes each
layer's tensors by them (see ``gguf_layout``):

* ``deci`` (NVIDIA's heterogeneous Llama) for Llama / Mistral / Qwen2. q_proj/k_proj rows
  are reordered per head from Hugging Face's half-split RoPE layout to ggml's pairwise one
  (``gguf_rope``). Biases: q/k/v, attention output, gate/up/down.
* ``openelm`` for Qwen3 (tied embeddings, no biases): fused QKV, per-head q/k RMSNorm,
  NEOX RoPE (no reordering).

Gemma (2, 3) and Phi-3 are refused with the reason: llama.cpp's graphs for them build every
layer at layer 0's sizes (``gguf_layout.REFUSED_FAMILIES``).

Attention-free or MLP-free layers that the graph cannot skip are written as zero-output
blocks (``gguf_layout``). The tokenizer goes along (``gguf_tokenizer``).

Output types: ``f32`` (exact), ``f16``, ``q8_0`` (matrices whose rows are not a multiple
of 32 fall back to f16). Norms, biases and ``rope_freqs`` always stay f32.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Literal, get_args

import gguf
import numpy as np

from gqa_prune.errors import GQAPruneError
from gqa_prune.export.gguf_layout import LayerLayout, export_arch, head_dim_of, layer_layout
from gqa_prune.export.gguf_rope import rope_settings
from gqa_prune.export.gguf_tensors import encode, tensor_plan
from gqa_prune.export.gguf_tokenizer import read_tokenizer
from gqa_prune.export.hf_weights import CheckpointWeights
from gqa_prune.models.source_checks import check_weight_files, read_config

log = logging.getLogger(__name__)

OutType = Literal["f32", "f16", "q8_0"]
OUTTYPES: tuple[str, ...] = get_args(OutType)
_FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}


def _write_metadata(
    writer: gguf.GGUFWriter, config: dict[str, Any], layout: LayerLayout, outtype: str, name: str
) -> None:
    head_dim = head_dim_of(config)
    writer.add_name(name)
    writer.add_description("GQA-pruned with gqa-prune (per-layer heads and MLP widths)")
    writer.add_block_count(len(layout.n_head))
    context = int(config.get("max_position_embeddings", 4096))
    window = config.get("sliding_window")
    if window and config.get("use_sliding_window", True) and int(window) < context:
        log.warning(
            "sliding_window=%s is not supported by llama.cpp's %s graph (full attention); "
            "context_length is set to the window so both runtimes agree up to it",
            window,
            layout.arch,
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
    """Write a checkpoint folder as a GGUF file for llama.cpp (``deci``, or ``openelm`` for Qwen3).

    Args:
        checkpoint_dir: a folder written by :func:`gqa_prune.save_pruned`, or a dense
            Hugging Face Llama / Mistral / Qwen2 / Qwen3 folder (safetensors +
            ``tokenizer.json``).
        out_path: the ``.gguf`` file to write (written to a temp file, then renamed).
        outtype: ``f32``, ``f16`` or ``q8_0`` for the weight matrices.
        overwrite: replace an existing ``out_path``.

    Returns:
        ``out_path``.

    Raises:
        GQAPruneError: an existing output without ``overwrite``, an unknown ``outtype``, or a
            checkpoint llama.cpp cannot represent (the message says what; Gemma and Phi-3
            are refused by family, ``gguf_layout.REFUSED_FAMILIES``).
    """
    src, out = Path(checkpoint_dir), Path(out_path)
    if outtype not in OUTTYPES:
        raise GQAPruneError(f"--outtype '{outtype}' is not one of {', '.join(OUTTYPES)}")
    if out.exists() and not overwrite:
        raise GQAPruneError(f"{out} already exists; pass --overwrite to replace it")
    if not (src / "config.json").is_file():
        raise GQAPruneError(f"{src} is not a model folder (no readable config.json)")
    config = read_config(src)  # damaged files: one line naming the file
    check_weight_files(src)
    weights = CheckpointWeights(src)
    arch = export_arch(config, weights)
    layout = layer_layout(config, weights, arch)
    plan = tensor_plan(config, weights, layout, outtype)
    weights.check_all_used({key for t in plan for key in t.sources}, arch)
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
        writer = gguf.GGUFWriter(tmp, arch=arch)
        _write_metadata(writer, config, layout, outtype, src.resolve().name)
        vocab.write_to(writer)
        for t in plan:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in plan:  # one tensor in memory at a time
            writer.write_tensor_data(encode(t.make(), t.qtype))
        writer.close()
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise GQAPruneError(f"cannot write {out}: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
