"""Memory as a design parameter: sizes, the per-layer budget check, and peak measurement.

Only light imports here (``config.py`` parses ``--max_memory`` with :func:`parse_memory`).

What the compute device holds in streaming mode (see :mod:`.executor`)::

    resident   embeddings, rotary tables, final norm, lm_head        (whole run)
             + one batch of logits for the loss (B x L x vocab, fp32)
    one layer  the decoder layer being worked on, in the model dtype
             + the working memory of the current step:
               taylor   its weight gradients (model dtype) and the fp32 element scores
               wanda / magnitude   fp32 element scores
               lstsq    fp32 Gram matrix I x I and the fp64 solve (~16 I^2 bytes)
             + the activations of one batch through that layer

The boundary hidden states of all calibration samples live on the host (CPU RAM), not on
the compute device (on a CPU-only machine host and device are the same memory).
"""

from __future__ import annotations

import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from gqa_prune.compensation.sequential import target_blend
from gqa_prune.errors import GQAPruneError

GIB = 1024**3
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_memory(value: int | float | str) -> int:
    """Bytes from ``20GiB``, ``500MB``, ``1.5e9`` or an int (GB = 1000^3, GiB = 1024^3).

    Raises:
        GQAPruneError: not a positive size.
    """
    if isinstance(value, bool):
        raise GQAPruneError(f"--max_memory must be a size such as 20GiB, got {value!r}")
    if isinstance(value, (int, float)):
        size = float(value)
    else:
        match = _SIZE.match(str(value))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            try:
                size = float(value)
            except ValueError:
                raise GQAPruneError(
                    f"--max_memory '{value}' is not a size; use e.g. 20GiB, 500MB or 1.5e9 (bytes)"
                ) from None
        else:
            size = float(match.group(1)) * _UNITS[unit]
    if not size > 0:
        raise GQAPruneError(f"--max_memory must be positive, got {value!r}")
    return int(size)


def gib(n: float) -> str:
    """``n`` bytes as ``'1.23 GiB'`` (``'12.3 MiB'`` below 1 GiB)."""
    if n < GIB:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / GIB:.2f} GiB"


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (works on meta tensors; shared ones once)."""
    seen: set[int] = set()
    total = 0
    for t in (*module.parameters(), *module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def outside_bytes(model: torch.nn.Module, layers: list[torch.nn.Module]) -> int:
    """Bytes of ``model``'s parameters and buffers outside ``layers`` (shared ones once)."""
    inside = {id(t) for layer in layers for t in (*layer.parameters(), *layer.buffers())}
    seen: set[int] = set()
    total = 0
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in inside and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


# ------------------------------------------------------------------ the budget
@dataclass(frozen=True)
class LayerNeed:
    """Compute-device bytes one decoder layer needs while it is worked on."""

    layer: int
    weights: int
    activations: int
    working: int
    step: str

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.working


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated compute-device bytes of a streaming run (an upper bound, not a promise).

    Attributes:
        resident: modules kept on the device all run (embeddings, final norm, lm_head), plus
            decoder layers that stay there (all of them when the layers rest in the same
            memory, i.e. CPU streaming without ``--offload_dir``), plus one batch of logits.
        largest: the most demanding layer and step.
        dense: estimate of the in-memory (non-streaming) run, for ``--max_memory`` auto mode.
    """

    resident: int
    largest: LayerNeed
    dense: int

    @property
    def peak(self) -> int:
        return self.resident + self.largest.total

    def to_dict(self) -> dict[str, Any]:
        return {
            "resident_bytes": self.resident,
            "largest_layer": {**asdict(self.largest), "total": self.largest.total},
            "peak_bytes": self.peak,
            "dense_bytes": self.dense,
        }


def estimate_memory(
    layers: list[torch.nn.Module],
    resident_modules_bytes: int,
    layers_resident: bool,
    *,
    hidden: int,
    vocab: int,
    num_heads: int,
    dtype_bytes: int,
    batch_size: int,
    seq_len: int,
    criterion: str,
    compensation: str,
    needs_grad: bool,
    selection: str = "score",
    target: str = "local",
    calibration_tokens: int = 0,
    compensation_seq_len: int = 0,
) -> MemoryPlan:
    """Upper-bound estimate of the compute-device memory of a streaming run.

    Args:
        layers: the decoder layers (meta tensors are fine: only shapes are read).
        resident_modules_bytes: bytes of everything outside the decoder layers.
        layers_resident: the layers rest in the compute device's memory too (CPU streaming
            without ``--offload_dir``), so all of them count.
        hidden, vocab, num_heads: model shapes.
        dtype_bytes: bytes per weight/activation element.
        batch_size, seq_len: one forward batch.
        criterion: unit criterion (``taylor``/``taylor2`` keep gradients).
        compensation: ``lstsq`` adds its Gram matrix and fp64 solve.
        needs_grad: the criterion backpropagates (Taylor).
        selection: ``repair`` holds ``H^-1`` (fp64), a transient fp64 copy and ``W'`` (fp64)
            beside the fp32 Gram matrix instead of the ridge solve.
        target: ``dense`` (or a blend) adds the fp32 cross product ``X^T Y`` (out x in).
        calibration_tokens: compensation tokens (samples x length). Their boundary hidden
            states and the current layer's recordings (the engine's projection inputs and
            block outputs; the dense stream and targets with ``dense``) rest on the host:
            counted where that is the compute device's memory (in memory, and CPU streaming
            with the layers in RAM).
        compensation_seq_len: tokens per compensation window, when they differ from
            ``seq_len``: a layer's activations count the longer of the two (0 = ``seq_len``).
    """
    tokens = batch_size * seq_len
    layer_seq = max(seq_len, compensation_seq_len) if compensation != "none" else seq_len
    layer_tokens = batch_size * layer_seq
    # logits in the model dtype and fp32 (+ their gradient for Taylor)
    logits = tokens * vocab * (dtype_bytes + 4 + (4 if needs_grad else 0))
    weights = [module_bytes(layer) for layer in layers]
    resident = resident_modules_bytes + logits + (sum(weights) if layers_resident else 0)
    largest: LayerNeed | None = None
    dense_acts = dense_scores = dense_other = 0
    widest_all = hidden  # the widest projection of any layer
    for i, layer in enumerate(layers):
        linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        biggest = max((m.weight.numel() for m in linears), default=0)
        widest = max((max(m.in_features, m.out_features) for m in linears), default=hidden)
        widest_all = max(widest_all, widest)
        # one batch through the layer: in/out/grad boundary states, q/k/v/o and the MLP
        # intermediates (kept for backward), and eager attention scores as an upper bound
        acts = layer_tokens * (8 * hidden + 4 * widest) * dtype_bytes
        acts += batch_size * num_heads * layer_seq * layer_seq * 4
        if needs_grad:
            acts *= 2
        # fp32 element scores of a block (three projections' worth, and their concat)
        steps = {"scores": 2 * 4 * 3 * biggest}
        if compensation == "lstsq":
            if selection == "repair":  # Gram fp32 + H^-1 and its transient fp64 + W' fp64
                steps["lstsq"] = 20 * widest * widest + 8 * biggest
            else:  # Gram fp32 + the fp64 solve
                steps["lstsq"] = 16 * widest * widest + 24 * biggest
            if target_blend(target) > 0:  # X^T Y (fp32)
                steps["lstsq"] += 4 * biggest
        elif compensation == "bias":
            steps["bias"] = 8 * widest
        step, work = max(steps.items(), key=lambda kv: kv[1])
        grads = weights[i] if needs_grad and step == "scores" else 0
        need = LayerNeed(i, 0 if layers_resident else weights[i], acts, work + grads, step)
        if largest is None or need.total > largest.total:
            largest = need
        dense_acts = dense_acts + acts if needs_grad else max(dense_acts, acts)
        dense_scores = max(dense_scores, steps["scores"])
        dense_other = max([dense_other, acts, *(v for k, v in steps.items() if k != "scores")])
    if largest is None:
        raise GQAPruneError("the model has no decoder layers")
    # per token: the stream, and with a refit the recorded inputs of o_proj and down_proj
    # (at most the widest projection each) and the two block outputs
    per_token = hidden
    if compensation != "none":
        per_token += 2 * widest_all + 2 * hidden + (3 * hidden if target_blend(target) > 0 else 0)
    held = calibration_tokens * per_token * dtype_bytes
    if layers_resident:
        resident += held
    # in memory: every layer resident; while scoring, one full-model backward keeps the
    # gradients of every projection and the activations of every layer at once; the
    # compensation runs afterwards, with one layer's working memory
    scoring = logits + dense_acts + dense_scores + (sum(weights) if needs_grad else 0)
    dense = resident_modules_bytes + sum(weights) + max(scoring, dense_other) + held
    return MemoryPlan(resident=resident, largest=largest, dense=dense)


def check_fits(plan: MemoryPlan, max_memory: int | None, advice: str = "") -> None:
    """Raise a GQAPruneError when even one layer does not fit ``max_memory``."""
    if max_memory is None or plan.peak <= max_memory:
        return
    need = plan.largest
    raise GQAPruneError(
        f"layer {need.layer} needs {gib(need.total)} (weights {gib(need.weights)}, "
        f"activations {gib(need.activations)}, {need.step} working memory "
        f"{gib(need.working)}) on top of {gib(plan.resident)} resident (embeddings, final "
        f"norm, lm_head, logits{', all layers' if need.weights == 0 else ''}), but "
        f"--max_memory allows {gib(max_memory)}; "
        + (advice or "raise --max_memory, lower --taylor_batch_size or --taylor_seq_len")
    )


# ------------------------------------------------------------------ peak measurement
_STATUS = Path("/proc/self/status")


def cpu_peak_rss() -> int:
    """Peak resident set size of this process in bytes (VmHWM; ru_maxrss elsewhere)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class MemoryMonitor:
    """Peak memory of a run: CPU peak RSS and, on CUDA, ``torch.cuda.max_memory_allocated``.

    ``mark(step)`` records the peaks so far; call it before anything that resets the peak
    counters (``measure_speed`` does) so that the run's overall peak survives. ``report()``
    gives the dict stored as ``summary.json["peak_memory"]``.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.steps: dict[str, dict[str, int | None]] = {}

    def mark(self, step: str) -> None:
        cuda = None
        if self.cuda:
            torch.cuda.synchronize(self.device)
            cuda = int(torch.cuda.max_memory_allocated(self.device))
        self.steps[step] = {"cpu_max_rss_bytes": cpu_peak_rss(), "cuda_max_allocated_bytes": cuda}

    def report(self) -> dict[str, Any]:
        if not self.steps:
            self.mark("end")
        cpu = max(int(s["cpu_max_rss_bytes"] or 0) for s in self.steps.values())
        cuda_values = [s["cuda_max_allocated_bytes"] for s in self.steps.values()]
        cuda = max(int(c) for c in cuda_values if c is not None) if self.cuda else None
        return {
            "cpu_max_rss_bytes": cpu,
            "cpu_max_rss_gib": round(cpu / GIB, 3),
            "cuda_max_allocated_bytes": cuda,
            "cuda_max_allocated_gib": None if cuda is None else round(cuda / GIB, 3),
            "device": str(self.device),
            "by_step": self.steps,
        }
