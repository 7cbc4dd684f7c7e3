"""First-order Taylor importance |w * dL/dw| (Molchanov et al. 2019; LLM-Pruner).

Removing a weight changes the loss by about ``-w * g`` (first order), so a unit's
importance is the sum of ``|w * g|`` over its weights. Gradients come from the
calibration loss: one forward/backward per calibration batch for the whole model, and
the per-unit scores are accumulated in fp32 across batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from gqa_prune.errors import GQAPruneError
from gqa_prune.importance.base import Aggregation, UnitScores, layer_unit_scores
from gqa_prune.models.adapters import ArchitectureAdapter, get_adapter


def _taylor_first(param: nn.Parameter, kind: str) -> torch.Tensor:
    if param.grad is None:
        raise RuntimeError("Taylor importance needs gradients; none were computed")
    return (param.detach().float() * param.grad.float()).abs()


def _taylor_second(param: nn.Parameter, kind: str) -> torch.Tensor:
    # |w g| + 1/2 w^2 F, with the diagonal Fisher F estimated by g^2 of this batch.
    wg = param.detach().float() * param.grad.float()
    return wg.abs() + 0.5 * wg.pow(2)


@contextmanager
def _only_projections_trainable(model: nn.Module, adapter: ArchitectureAdapter) -> Iterator[None]:
    """Gradients for the q/k/v/o and gate/up/down weights only; restore flags afterwards."""
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in adapter.decoder_layers(model):
        for proj in (*adapter.attention_projections(layer), *adapter.mlp_projections(layer)):
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
        second_order: add the ``1/2 * (w g)^2`` diagonal-Fisher term (``taylor2``).
        aggregation: how element scores combine within a unit.

    Returns:
        Per-layer fp32 scores (sum over batches).
    """
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
                    f"channel importance: calibration loss is {loss.item()} at batch {step}; "
                    "use --dtype float32 or check the model weights"
                )
            loss.backward()
            scores = layer_unit_scores(model, adapter, score_fn, aggregation)
            if total is None:
                total = scores
            else:
                total.add_(scores)
        model.zero_grad(set_to_none=True)
    if total is None:
        raise GQAPruneError("channel importance needs at least one calibration sample")
    total.check_finite("channel importance")
    return total
