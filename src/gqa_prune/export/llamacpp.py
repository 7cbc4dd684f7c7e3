"""Run a GGUF file in llama.cpp (through ``llama-cpp-python``) and compare it with PyTorch.

Optional: needs the ``llamacpp`` extra (``pip install 'gqa-prune[llamacpp]'``, which builds
llama.cpp from source; see ``scripts/install_llama_cpp.sh``). Used by the slow test
``tests/slow/test_gguf_llama_cpp.py`` and ``bench/bench_gguf_llamacpp.py``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gqa_prune.errors import GQAPruneError


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise GQAPruneError(
            "llama-cpp-python is not installed; run scripts/install_llama_cpp.sh "
            "(or pip install 'gqa-prune[llamacpp]')"
        ) from None
    return llama_cpp


def llama_cpp_logits(
    gguf_path: str | Path,
    windows: Sequence[Sequence[int]],
    f32_kv_cache: bool = True,
    n_threads: int | None = None,
) -> list[np.ndarray]:
    """Logits llama.cpp computes for every position of every token window.

    Args:
        gguf_path: the GGUF file.
        windows: token id lists, each evaluated from an empty KV cache.
        f32_kv_cache: keep the KV cache in f32 (llama.cpp's default is f16, which alone
            moves logits by ~1e-2); compare weights, not cache precision.
        n_threads: CPU threads (default: all cores).

    Returns:
        One ``(len(window), vocab)`` float32 array per window.
    """
    llama_cpp = _llama_cpp()
    n_ctx = max(len(w) for w in windows)
    cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
    llm = llama_cpp.Llama(
        model_path=str(gguf_path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=n_ctx,
        logits_all=True,
        verbose=False,
        n_threads=n_threads or os.cpu_count() or 1,
        **(cache if f32_kv_cache else {}),
    )
    try:
        out = []
        for window in windows:
            llm.reset()
            llm.eval(list(window))
            out.append(np.array(llm.scores[: len(window)], dtype=np.float32))
        return out
    finally:
        llm.close()


def llama_cpp_tokenize(gguf_path: str | Path, text: str, add_special: bool = False) -> list[int]:
    """Token ids llama.cpp's tokenizer (from the GGUF metadata) gives ``text``.

    Args:
        add_special: add BOS/EOS as the file's ``add_bos_token``/``add_eos_token`` say (like
            a Hugging Face tokenizer with ``add_special_tokens=True``); special-token text in
            ``text`` is not parsed either way.
    """
    llama_cpp = _llama_cpp()
    llm = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    try:
        return list(llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=False))
    finally:
        llm.close()


@dataclass(frozen=True)
class LogitComparison:
    """How far llama.cpp's logits are from the reference (PyTorch) logits.

    Attributes:
        max_abs / mean_abs: largest and mean absolute difference over all positions and
            vocabulary entries.
        ref_std: standard deviation of the reference logits (scale for the above).
        top1_agreement: share of positions where both pick the same most likely token.
    """

    max_abs: float
    mean_abs: float
    ref_std: float
    top1_agreement: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def compare_logits(reference: np.ndarray, other: np.ndarray) -> LogitComparison:
    """Compare two ``(..., vocab)`` logit arrays of the same shape."""
    if reference.shape != other.shape:
        raise ValueError(f"logit shapes differ: {reference.shape} vs {other.shape}")
    ref, oth = reference.astype(np.float64), other.astype(np.float64)
    diff = np.abs(ref - oth)
    top1 = (ref.argmax(-1) == oth.argmax(-1)).mean()
    return LogitComparison(float(diff.max()), float(diff.mean()), float(ref.std()), float(top1))


def perplexity_of_logits(logits: Sequence[np.ndarray], windows: Sequence[Sequence[int]]) -> float:
    """Token-weighted perplexity: each window predicts its tokens 1.. from the ones before."""
    nll, count = 0.0, 0
    for lg, ids in zip(logits, windows, strict=True):
        x = lg[:-1].astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(ids) - 1), np.asarray(ids[1:])].sum())
        count += len(ids) - 1
    return math.exp(nll / count)
