"""The pruning step and perplexity with one decoder layer on the device at a time."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

from gqa_prune.allocation import AllocationConfig
from gqa_prune.compensation import (
    DEFAULT_DAMP,
    DEFAULT_TARGET,
    DEFAULT_TARGET_NORM,
)
from gqa_prune.errors import GQAPruneError
from gqa_prune.evaluation.perplexity import (
    PerplexityResult,
    eval_batches,
    next_token_nll_sum,
)
from gqa_prune.models.adapters import get_adapter
from gqa_prune.planning import PruneOutcome, needs_unit_scores, prune_walk_
from gqa_prune.streaming.executor import LayerStreamer
from gqa_prune.streaming.memory import MemoryPlan, check_fits, estimate_memory, outside_bytes
from gqa_prune.streaming.scores import streaming_unit_scores

log = logging.getLogger(__name__)

_GRAD_CRITERIA = ("taylor", "taylor2")


def plan_memory(
    model: torch.nn.Module,
    batch_size: int,
    seq_len: int,
    criterion: str = "taylor",
    compensation: str = "lstsq",
    layers_in_device_memory: bool = False,
    selection: str = "score",
    target: str = DEFAULT_TARGET,
    mode: str = "layer",
    calibration_tokens: int = 0,
    sensitivity_weights: str = "stream",
    compensation_seq_len: int = 0,
) -> MemoryPlan:
    """Estimate the compute-device memory of pruning ``model`` (an upper bound).

    Args:
        model: the model (its layers may be meta tensors: only shapes are read).
        batch_size, seq_len: one calibration batch.
        criterion, compensation: the pruning settings (Taylor keeps gradients, ``lstsq``
            a Gram matrix and its solve).
        layers_in_device_memory: the parked layers share the device's memory.
        selection, target, mode: ``repair`` selection in ``layer`` mode computes no unit
            scores (no gradients); ``repair`` and ``dense`` targets hold more per layer.
        calibration_tokens: compensation samples x length (see ``estimate_memory``).
        compensation_seq_len: tokens per compensation window (0 = ``seq_len``).
    """
    config: Any = model.config
    layers = list(get_adapter(model).decoder_layers(model))
    first = next(p for p in layers[0].parameters())
    return estimate_memory(
        layers,
        outside_bytes(model, layers),
        layers_in_device_memory,
        hidden=int(config.hidden_size),
        vocab=int(config.vocab_size),
        num_heads=int(config.num_attention_heads),
        dtype_bytes=first.element_size(),
        batch_size=batch_size,
        seq_len=seq_len,
        criterion=criterion,
        compensation=compensation,
        needs_grad=(criterion in _GRAD_CRITERIA and needs_unit_scores(mode, selection))
        or (mode == "sensitivity" and sensitivity_weights == "gradient"),
        # sensitivity runs the repair's greedy (to the end) on every projection
        selection="repair" if mode == "sensitivity" else selection,
        target=target,
        calibration_tokens=calibration_tokens,
        compensation_seq_len=compensation_seq_len,
    )


def check_streaming_memory(
    streamer: LayerStreamer,
    batch_size: int,
    seq_len: int,
    criterion: str,
    compensation: str,
    selection: str = "score",
    target: str = DEFAULT_TARGET,
    mode: str = "layer",
    calibration_tokens: int = 0,
    sensitivity_weights: str = "stream",
    compensation_seq_len: int = 0,
) -> MemoryPlan:
    """Raise a GQAPruneError if one layer plus the resident modules exceed ``max_memory``."""
    plan = plan_memory(
        streamer.model,
        batch_size,
        seq_len,
        criterion,
        compensation,
        streamer.layers_in_device_memory,
        selection,
        target,
        mode,
        calibration_tokens,
        sensitivity_weights,
        compensation_seq_len,
    )
    advice = "raise --max_memory, lower --taylor_batch_size"
    if streamer.layers_in_device_memory:
        advice += ", or add --offload_dir DIR so the layers wait on disk instead of in RAM"
    if compensation == "lstsq" and plan.largest.step == "lstsq":
        advice += ", or use --compensation bias (no Gram matrix)"
    check_fits(plan, streamer.max_memory, advice)
    log.info(
        "streaming memory estimate: %.2f GiB resident + %.2f GiB for layer %d (%s)",
        plan.resident / 2**30,
        plan.largest.total / 2**30,
        plan.largest.layer,
        plan.largest.step,
    )
    return plan


def prune_model_streaming_(
    streamer: LayerStreamer,
    calibration_ids: torch.Tensor,
    allocation_config: AllocationConfig,
    layer_importance: Sequence[float] | None = None,
    criterion: str = "taylor",
    aggregation: str = "sum",
    mode: str = "layer",
    batch_size: int = 1,
    seed: int = 0,
    progress: bool = True,
    compensation: str = "lstsq",
    compensation_ids: torch.Tensor | None = None,
    compensation_damp: float = DEFAULT_DAMP,
    selection: str = "score",
    compensation_target: str = DEFAULT_TARGET,
    sensitivity_weights: str = "stream",
    compensation_target_norm: str = DEFAULT_TARGET_NORM,
) -> PruneOutcome:
    """:func:`gqa_prune.prune_model_` with one decoder layer on the device at a time.

    Same arguments (``streamer`` holds the model) and the same result: scores, plan and
    pruned weights equal the in-memory run's (up to floating-point summation order).
    Checks the memory cap first (:func:`check_streaming_memory`).
    """
    seq_len = int(calibration_ids.shape[-1]) if calibration_ids is not None else 1
    windows = compensation_ids if compensation_ids is not None else calibration_ids
    return prune_walk_(
        streamer,
        calibration_ids,
        allocation_config,
        layer_importance,
        mode,
        lambda: streaming_unit_scores(
            streamer, calibration_ids, criterion, aggregation, batch_size, seed, progress
        ),
        lambda ids, when: check_finite_streaming(streamer, ids, when),
        batch_size=batch_size,
        progress=progress,
        compensation=compensation,
        compensation_ids=compensation_ids,
        compensation_damp=compensation_damp,
        selection=selection,
        compensation_target=compensation_target,
        compensation_target_norm=compensation_target_norm,
        sensitivity_weights=sensitivity_weights,
        before_planning=lambda: check_streaming_memory(
            streamer,
            batch_size,
            seq_len,
            criterion,
            compensation,
            selection,
            compensation_target,
            mode,
            # the compensation windows' recordings, as the CLI counts them (run.py)
            calibration_tokens=int(windows.numel()) if windows is not None else 0,
            sensitivity_weights=sensitivity_weights,
            compensation_seq_len=int(windows.shape[-1]) if windows is not None else 0,
        ),
    )


@torch.no_grad()
def check_finite_streaming(streamer: LayerStreamer, input_ids: torch.Tensor, step: str) -> None:
    """Raise a GQAPruneError naming ``step`` if the streamed model's logits are not finite."""
    states, calls = streamer.capture([input_ids])
    streamer.forward_(states, calls)
    if not torch.isfinite(streamer.logits(states[0])).all():
        raise GQAPruneError(f"{step}: the model produces non-finite logits")


@torch.no_grad()
def streaming_perplexity(
    streamer: LayerStreamer,
    tokens: torch.Tensor,
    seq_len: int = 128,
    max_windows: int | None = None,
    batch_size: int = 8,
    dataset: str = "",
    progress: bool = True,
    bos_token_id: int | None = None,
) -> PerplexityResult:
    """:func:`gqa_prune.evaluation.perplexity.evaluate_perplexity` of a streamed model.

    Same windows, batches and token-weighted NLL; the hidden states of all windows wait on
    the host between layers (``windows x seq_len x hidden`` values in the model dtype).
    """
    max_pos = getattr(streamer.model.config, "max_position_embeddings", None)
    batches, num_windows = eval_batches(
        tokens, seq_len, max_windows, batch_size, max_pos, bos_token_id
    )
    states, calls = streamer.capture(batches)
    streamer.forward_(states, calls, desc=f"perplexity {dataset}".strip(), progress=progress)
    nll_sum, count = 0.0, 0
    for hidden, batch in zip(states, batches, strict=True):
        nll, n = next_token_nll_sum(streamer.logits(hidden), batch)
        nll_sum += nll
        count += n
    return PerplexityResult(
        ppl=math.exp(nll_sum / count),
        nll_sum=nll_sum,
        num_tokens=count,
        num_windows=num_windows,
        seq_len=seq_len,
        dataset=dataset,
    )
