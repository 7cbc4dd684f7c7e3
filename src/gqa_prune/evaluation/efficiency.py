"""Efficiency of a model: parameters, size, prefill / decode throughput and peak memory.

Throughput is measured on random token ids (speed does not depend on the text):

    prefill tokens/s = batch_size * prompt_len / t(one forward over the prompt)
    decode tokens/s  = batch_size * new_tokens / t(new_tokens greedy steps with the KV cache)

each time the median of ``repeats`` runs after ``warmup`` runs. Peak memory is read on the
model's device: on CUDA ``torch.cuda.max_memory_allocated`` (tensors only, reset before
the measurement); on CPU the peak resident set size of the whole process (Linux
``VmHWM``, reset through ``/proc/self/clear_refs``; elsewhere the process-lifetime peak
``ru_maxrss``). CPU figures therefore include Python, torch and every model the process
holds, not only the one measured.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from gqa_prune.errors import GQAPruneError

MemoryKind = Literal["cuda_max_allocated", "cpu_peak_rss", "cpu_peak_rss_lifetime"]
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclass(frozen=True)
class SpeedResult:
    """Efficiency figures of one model on one device.

    Attributes:
        label: what was measured (e.g. ``dense``, ``pruned``).
        params: parameters (tied ones once).
        size_bytes: bytes of the weight files of ``checkpoint`` when given, else
            ``sum(numel * element_size)`` of the parameters (``size_source`` says which).
        prefill_tokens_per_s: prompt tokens processed per second (one forward).
        decode_tokens_per_s: generated tokens per second (greedy, KV cache).
        peak_memory_bytes: see the module docstring; ``memory_kind`` says which figure.
    """

    label: str
    params: int
    size_bytes: int
    size_source: Literal["disk", "estimate"]
    device: str
    dtype: str
    batch_size: int
    prompt_len: int
    new_tokens: int
    repeats: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    peak_memory_bytes: int
    memory_kind: MemoryKind

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def count_params(model: nn.Module) -> int:
    """Parameters of ``model``, each shared (tied) tensor counted once."""
    return sum(p.numel() for p in model.parameters())


def estimated_size_bytes(model: nn.Module) -> int:
    """Bytes of the parameters in their current dtype (what a safetensors file holds)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def checkpoint_size_bytes(path: str | Path) -> int:
    """Bytes of the weight files of a saved model (a folder, or one weight file).

    Raises:
        GQAPruneError: ``path`` does not exist or holds no weight file.
    """
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    files = [f for f in path.rglob("*") if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES)]
    if not files:
        raise GQAPruneError(
            f"no weight file ({', '.join(WEIGHT_SUFFIXES)}) under {path}; pass a saved model"
        )
    return sum(f.stat().st_size for f in files)


# ------------------------------------------------------------------ peak memory
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _reset_peak(device: torch.device) -> MemoryKind:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda_max_allocated"
    try:  # Linux >= 4.0: writing 5 resets the peak RSS (VmHWM) to the current RSS
        _CLEAR_REFS.write_text("5")
        return "cpu_peak_rss"
    except OSError:
        return "cpu_peak_rss_lifetime"


def _read_peak(device: torch.device, kind: MemoryKind) -> int:
    if kind == "cuda_max_allocated":
        return int(torch.cuda.max_memory_allocated(device))
    if kind == "cpu_peak_rss":
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, else kB


# ------------------------------------------------------------------ timing
def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _cache_kwarg(model: nn.Module) -> str:
    """``cache`` in transformers >= 5.2x; ``past_key_values`` before (and in custom code)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> Callable[[], None]:
    """Prefill ``prompt`` now (untimed); return the greedy loop over the KV cache to time."""
    name = _cache_kwarg(model)
    out = model(input_ids=prompt, use_cache=True)

    def loop() -> None:
        nonlocal out
        for _ in range(new_tokens):
            nxt = out.logits[:, -1:].argmax(-1)
            cache = getattr(out, name, None)
            out = model(input_ids=nxt, use_cache=True, **{name: cache})

    return loop


def check_speed_settings(
    prompt_len: int, new_tokens: int, batch_size: int, repeats: int, warmup: int
) -> None:
    """Raise a one-line :class:`GQAPruneError` for a non-positive setting (``warmup`` >= 0)."""
    settings = dict(
        prompt_len=prompt_len, new_tokens=new_tokens, batch_size=batch_size, repeats=repeats
    )
    for name, value in settings.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise GQAPruneError(f"--{name} must be a positive integer, got {value!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise GQAPruneError(f"--warmup must be an integer >= 0, got {warmup!r}")


@torch.no_grad()
def measure_speed(
    model: nn.Module,
    *,
    label: str = "model",
    prompt_len: int = 128,
    new_tokens: int = 32,
    batch_size: int = 1,
    repeats: int = 3,
    warmup: int = 1,
    checkpoint: str | Path | None = None,
    seed: int = 0,
) -> SpeedResult:
    """Measure prefill and decode throughput and peak memory of ``model`` on its device.

    Args:
        model: a causal LM (pruned or not); it is put in eval mode for the measurement.
        label: name of the row (``dense``, ``pruned``, ...).
        prompt_len: prompt tokens per sequence.
        new_tokens: greedy decode steps after the prompt.
        batch_size: sequences per forward.
        repeats: timed runs; the median is reported.
        warmup: untimed runs first (allocator, kernels, caches).
        checkpoint: saved model folder (or weight file) whose size is reported.
        seed: seed of the random prompt.

    Raises:
        GQAPruneError: a non-positive setting, or ``prompt_len + new_tokens`` beyond the
            model's ``max_position_embeddings``.
    """
    check_speed_settings(prompt_len, new_tokens, batch_size, repeats, warmup)
    config = getattr(model, "config", None)
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and prompt_len + new_tokens > max_pos:
        raise GQAPruneError(
            f"--prompt_len {prompt_len} + --new_tokens {new_tokens} exceeds the model's "
            f"{max_pos} positions; lower one of them"
        )
    param = next(model.parameters())
    device, vocab = param.device, int(getattr(config, "vocab_size", 0) or 100)
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (batch_size, prompt_len), generator=gen).to(device)
    was_training = model.training
    model.eval()
    kind = _reset_peak(device)
    try:
        for _ in range(warmup):
            model(input_ids=prompt, use_cache=True)
            _decode(model, prompt, min(new_tokens, 2))()
        prefill = [
            _timed(lambda: model(input_ids=prompt, use_cache=True), device) for _ in range(repeats)
        ]
        decode = [_timed(_decode(model, prompt, new_tokens), device) for _ in range(repeats)]
        peak = _read_peak(device, kind)
    finally:
        model.train(was_training)
    size = checkpoint_size_bytes(checkpoint) if checkpoint is not None else None
    return SpeedResult(
        label=label,
        params=count_params(model),
        size_bytes=estimated_size_bytes(model) if size is None else size,
        size_source="estimate" if size is None else "disk",
        device=str(device),
        dtype=str(param.dtype).removeprefix("torch."),
        batch_size=batch_size,
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        repeats=repeats,
        prefill_tokens_per_s=batch_size * prompt_len / statistics.median(prefill),
        decode_tokens_per_s=batch_size * new_tokens / statistics.median(decode),
        peak_memory_bytes=peak,
        memory_kind=kind,
    )


def speedup(dense: SpeedResult, pruned: SpeedResult) -> dict[str, float]:
    """Ratios pruned / dense (throughput > 1 = faster; params, size, memory < 1 = smaller)."""
    return {
        "params": pruned.params / dense.params,
        "size": pruned.size_bytes / dense.size_bytes,
        "prefill": pruned.prefill_tokens_per_s / dense.prefill_tokens_per_s,
        "decode": pruned.decode_tokens_per_s / dense.decode_tokens_per_s,
        "peak_memory": pruned.peak_memory_bytes / dense.peak_memory_bytes,
    }


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def format_speed_table(results: Sequence[SpeedResult]) -> str:
    """Text table, one column per result and, for two results, a ``ratio`` column."""
    if not results:
        return ""
    rows: list[list[str]] = [["", *(r.label for r in results)]]
    lines = [
        ("parameters", lambda r: f"{r.params:,}"),
        ("size", lambda r: f"{_mib(r.size_bytes)} ({r.size_source})"),
        ("prefill tokens/s", lambda r: f"{r.prefill_tokens_per_s:,.1f}"),
        ("decode tokens/s", lambda r: f"{r.decode_tokens_per_s:,.1f}"),
        ("peak memory", lambda r: f"{_mib(r.peak_memory_bytes)} ({r.memory_kind})"),
    ]
    for name, cell in lines:
        rows.append([name, *(cell(r) for r in results)])
    if len(results) == 2:
        ratios = speedup(*results)
        rows[0].append(f"{results[1].label} / {results[0].label}")
        for row, key in zip(rows[1:], ratios, strict=True):
            row.append(f"{ratios[key]:.3f}x")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    r0 = results[0]
    table.append(
        f"({r0.device} {r0.dtype}, batch {r0.batch_size}, prompt {r0.prompt_len} tokens, "
        f"{r0.new_tokens} new tokens, median of {r0.repeats} runs)"
    )
    return "\n".join(table)


__all__ = [
    "SpeedResult",
    "check_speed_settings",
    "checkpoint_size_bytes",
    "count_params",
    "estimated_size_bytes",
    "format_speed_table",
    "measure_speed",
    "speedup",
]
