"""The device and floating-point type a model loads onto, from the command line's names."""

from __future__ import annotations

from typing import Literal

import torch

from gqa_prune.errors import GQAPruneError

DType = Literal["auto", "float32", "bfloat16", "float16"]


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise the named device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise GQAPruneError(f"unknown device '{device}'; use auto, cpu or cuda") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GQAPruneError("--device cuda was asked for but no CUDA device is available; use cpu")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 on CPU."""
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in table:
        raise GQAPruneError(f"unknown dtype '{dtype}'; use auto, float32, bfloat16 or float16")
    return table[dtype]
