"""RoPE conventions: HF's half-split head layout -> ggml's pairwise one; RoPE settings.

Hugging Face rotates the pairs ``(j, j + d/2)`` of each head (``rotate_half``); ggml's
"normal" RoPE, used by llama.cpp's deci architecture, rotates adjacent pairs ``(2j, 2j + 1)``.
Reordering the rows of q_proj and k_proj (and their biases) within each head as
``[0, d/2, 1, d/2 + 1, ...]`` makes both runtimes compute the same attention scores::

    HF head rows     x0 x1 x2 x3 | y0 y1 y2 y3        (x_j, y_j) rotated together
    GGUF head rows   x0 y0 x1 y1 x2 y2 x3 y3

llama.cpp's openelm architecture (used for Qwen3) applies NEOX RoPE, which rotates the same
``(j, j + d/2)`` pairs as Hugging Face: its q/k rows are written unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from gqa_prune.errors import GQAPruneError


def rope_interleave(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Reorder q/k rows (or biases) from HF's half-split RoPE to ggml's pairwise RoPE.

    Args:
        w: ``(heads * head_dim, ...)`` weight or ``(heads * head_dim,)`` bias.
    """
    heads = w.shape[0] // head_dim
    return w.reshape(heads, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rope_deinterleave(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Inverse of :func:`rope_interleave`."""
    heads = w.shape[0] // head_dim
    return w.reshape(heads, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def llama3_rope_factors(rope: dict[str, Any], head_dim: int) -> torch.Tensor:
    """``rope_freqs``: per-frequency divisors that turn plain RoPE into Llama-3.1 RoPE.

    llama.cpp divides each rotary frequency by this factor; Llama-3.1 scaling keeps high
    frequencies, divides low ones by ``factor`` and blends in between (by wavelength).
    """
    theta = float(rope["rope_theta"])
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    factors = torch.where(wavelen > old_ctx / low, torch.full_like(blended, factor), blended)
    factors = torch.where(wavelen < old_ctx / high, torch.ones_like(blended), factors)
    return factors.to(torch.float32)


def rope_settings(config: dict[str, Any]) -> dict[str, Any]:
    """``rope_parameters`` (transformers >= 5) or the older ``rope_theta`` + ``rope_scaling``."""
    rope = dict(config.get("rope_parameters") or {})
    if not rope:
        rope = dict(config.get("rope_scaling") or {})
        rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope.setdefault("rope_theta", 10000.0)
    rope_type = rope.get("rope_type", rope.get("type")) or "default"
    rope["rope_type"] = rope_type
    if rope_type not in ("default", "linear", "llama3"):
        raise GQAPruneError(
            f"rope type '{rope_type}' cannot be exported to llama.cpp here "
            "(supported: default, linear, llama3)"
        )
    if "full_attention" in rope or "sliding_attention" in rope:
        raise GQAPruneError("per-layer-type RoPE settings cannot be exported to GGUF")
    return rope
