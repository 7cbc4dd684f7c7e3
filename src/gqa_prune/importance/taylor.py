"""Taylor importance from calibration-loss gradients: ``taylor`` and ``taylor2``.

First order (Molchanov et al. 2019, eq. 3; LLM-Pruner, Ma et al. 2023, eq. 4): removing
weight ``w`` (a step ``dw = -w``) changes the loss ``L`` by about ``-g * w`` with
``g = dL/dw``, so an element scores::

    s_taylor = |w * g|

Second order (Optimal Brain Damage, LeCun et al. 1990; LLM-Pruner eq. 5): the next term of
the expansion is ``1/2 * H_ii * w**2``; the Hessian diagonal is replaced by the empirical
Fisher diagonal ``F_ii ~ g**2``, estimated from the gradient of each calibration batch::

    s_taylor2 = |w * g| + 1/2 * (w * g)**2          (per batch)

Summed over batches ``b`` this is ``sum_b |w g_b| + 1/2 * w**2 * F`` with
``F = sum_b g_b**2``: the ``taylor`` score plus the OBD curvature term on the same scale.
LLM-Pruner writes ``|w g - 1/2 w^2 F|``; we add the two magnitudes instead, because near a
trained minimum the curvature term raises the loss whatever the sign of ``w g`` (which
flips between batches). So ``taylor2 >= taylor`` element-wise, and the two agree up to a
relative ``1/2 |w g|`` when gradients are small.

Gradients come from one forward/backward of the whole model per calibration batch (loss
= mean next-token cross-entropy of the batch); element scores are reduced to unit scores
per batch and those are summed over batches in fp32. For ``sum`` and ``mean`` that equals
reducing the element scores summed over batches; for ``max`` it is the sum of per-batch
maxima (keeping memory at one score per unit instead of an fp32 copy of every weight).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from gqa_prune.errors import GQAPruneError
from gqa_prune.importance.base import (
    Aggregation,
    UnitScores,
    check_aggregation,
    layer_unit_scores,
)
from gqa_prune.importance.registry import register_criterion
from gqa_prune.models.adapters import ArchitectureAdapter, get_adapter


def taylor_first_order(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Element-wise ``|w * g|`` in fp32 (any shape; ``weight`` and ``grad`` alike)."""
    return (weight.detach().float() * grad.float()).abs()


def taylor_second_order(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Element-wise ``|w * g| + 1/2 * (w * g)**2`` in fp32: first order + OBD with ``F ~ g**2``."""
    wg = weight.detach().float() * grad.float()
    return wg.abs() + 0.5 * wg.pow(2)


def _needs_grad(param: torch.Tensor) -> torch.Tensor:
    if param.grad is None:
        raise RuntimeError("Taylor importance needs gradients; none were computed")
    return param.grad


def _taylor_first(param: torch.Tensor, kind: str) -> torch.Tensor:
    return taylor_first_order(param, _needs_grad(param))


def _taylor_second(param: torch.Tensor, kind: str) -> torch.Tensor:
    return taylor_second_order(param, _needs_grad(param))


@contextmanager
def _only_projections_trainable(model: nn.Module, adapter: ArchitectureAdapter) -> Iterator[None]:
    """Gradients for the q/k/v/o and gate/up/down weights only; restore flags afterwards."""
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in adapter.decoder_layers(model):
        for proj in adapter.prunable_projections(layer):
            for p in proj.parameters():
                p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
            p.grad = None


def collect_taylor_scores(
    model: nn.Module,
    input_ids: torch.Tensor,
    batch_size: int = 1,
    second_order: bool = False,
    aggregation: Aggregation = "sum",
    progress: bool = True,
) -> UnitScores:
    """Taylor scores of every GQA group and MLP channel, accumulated over batches.

    Args:
        model: a causal LM (eval mode is kept; dropout stays off).
        input_ids: calibration tokens, shape ``(num_samples, seq_len)``, no padding.
        batch_size: samples per forward/backward pass.
        second_order: add the ``1/2 * (w g)**2`` diagonal-Fisher term (``taylor2``).
        aggregation: how element scores combine within a unit: ``sum``, ``mean``, ``max``.
        progress: show a progress bar.

    Returns:
        Per-layer fp32 scores (sum over batches).
    """
    check_aggregation(aggregation)
    step_name = "taylor2 importance" if second_order else "taylor importance"
    if input_ids.numel() == 0:
        raise GQAPruneError(f"{step_name} needs at least one calibration sample, got none")
    adapter = get_adapter(model)
    score_fn = _taylor_second if second_order else _taylor_first
    device = next(model.parameters()).device
    total: UnitScores | None = None
    batches = input_ids.split(batch_size)
    with _only_projections_trainable(model, adapter):
        for step, batch in enumerate(tqdm(batches, desc="taylor gradients", disable=not progress)):
            batch = batch.to(device)
            model.zero_grad(set_to_none=True)
            loss = model(input_ids=batch, labels=batch).loss
            if not torch.isfinite(loss):
                raise GQAPruneError(
                    f"{step_name}: calibration loss is {loss.item()} at batch {step}; "
                    "use --dtype float32 or check the model weights"
                )
            loss.backward()
            scores = layer_unit_scores(model, adapter, score_fn, aggregation)
            if total is None:
                total = scores
            else:
                total.add_(scores)
        model.zero_grad(set_to_none=True)
    assert total is not None  # input_ids is non-empty, so there was at least one batch
    total.check_finite(step_name)
    return total


@register_criterion("taylor", needs_data=True)
def taylor_scores(
    model: nn.Module,
    input_ids: torch.Tensor | None,
    *,
    aggregation: Aggregation = "sum",
    batch_size: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> UnitScores:
    """First-order Taylor ``|w * g|`` (see the module docstring); ``seed`` is unused."""
    if input_ids is None:
        raise GQAPruneError("taylor importance needs calibration input_ids, got None")
    return collect_taylor_scores(model, input_ids, batch_size, False, aggregation, progress)


@register_criterion("taylor2", needs_data=True)
def taylor2_scores(
    model: nn.Module,
    input_ids: torch.Tensor | None,
    *,
    aggregation: Aggregation = "sum",
    batch_size: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> UnitScores:
    """Taylor with the ``1/2 * w**2 * F`` Fisher term (see the module docstring)."""
    if input_ids is None:
        raise GQAPruneError("taylor2 importance needs calibration input_ids, got None")
    return collect_taylor_scores(model, input_ids, batch_size, True, aggregation, progress)
