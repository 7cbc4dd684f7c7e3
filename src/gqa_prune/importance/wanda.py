"""Wanda importance: weight magnitude times input activation norm (Sun et al. 2023).

Wanda (eq. 1 of "A Simple and Effective Pruning Approach for Large Language Models")
scores weight ``W_ij`` of a linear layer ``y = W x`` by::

    S_ij = |W_ij| * ||X_j||_2

where ``X_j`` is input feature ``j`` over all ``N`` calibration tokens (``N = samples *
seq_len``), so ``||X_j||_2 = sqrt(sum_t x_tj**2)``. The norms are collected with forward
pre-hooks on every q/k/v/o and gate/up/down projection during plain forwards (no
gradients), summing squares in fp32 across batches. q/k/v and gate/up read the
normalised hidden state; o_proj reads the attention output, one column per (query head,
dim), and down_proj reads the MLP activation ``act(gate) * up``, one column per channel,
so those two input norms are themselves per unit.

A bias ``b_i`` is a weight on a constant input of 1, whose norm over the ``N`` tokens is
``sqrt(N)``; it scores ``|b_i| * sqrt(N)``. Element scores are then reduced per unit
(``sum``/``mean``/``max``, see :mod:`.base`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from types import TracebackType
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from gqa_prune.errors import GQAPruneError
from gqa_prune.importance.base import Aggregation, UnitScores, check_aggregation, layer_unit_scores
from gqa_prune.importance.registry import register_criterion
from gqa_prune.models.adapters import get_adapter


def wanda_element_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||`` in fp32.

    Args:
        weight: shape ``(out_features, in_features)``.
        input_norm: L2 norm of each input feature over the calibration tokens,
            shape ``(in_features,)``.

    Returns:
        shape ``(out_features, in_features)``.
    """
    return weight.detach().float().abs() * input_norm.to(weight.device, torch.float32)[None, :]


class InputNormCollector:
    """Forward pre-hooks that accumulate ``sum_t x_tj**2`` of each module's input, in fp32.

    Use as a context manager: hooks are registered on entry and removed on exit, also
    when a forward raises.

    Attributes:
        sum_sq: module -> fp32 tensor ``(in_features,)``, on the input's device.
        tokens: module -> number of input rows (tokens) seen.
    """

    def __init__(self, modules: Iterable[nn.Linear]) -> None:
        self.modules = list(modules)
        self.sum_sq: dict[nn.Module, torch.Tensor] = {}
        self.tokens: dict[nn.Module, int] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> InputNormCollector:
        try:
            for module in self.modules:
                self._handles.append(module.register_forward_pre_hook(self._hook, with_kwargs=True))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this collector registered."""
        while self._handles:
            self._handles.pop().remove()

    def _hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs["input"]
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        sq = rows.pow(2).sum(dim=0)
        if module in self.sum_sq:
            self.sum_sq[module] += sq
            self.tokens[module] += rows.shape[0]
        else:
            self.sum_sq[module] = sq
            self.tokens[module] = rows.shape[0]

    def norms(self, module: nn.Module) -> torch.Tensor:
        """``||X_j||_2`` of ``module``'s input features, shape ``(in_features,)``."""
        if module not in self.sum_sq:
            raise GQAPruneError(
                f"wanda importance: {type(module).__name__} saw no input during the "
                "calibration forwards; is it part of the model's forward pass?"
            )
        return self.sum_sq[module].sqrt()


@register_criterion("wanda", needs_data=True)
def wanda_scores(
    model: nn.Module,
    input_ids: torch.Tensor | None,
    *,
    aggregation: Aggregation = "sum",
    batch_size: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> UnitScores:
    """Wanda ``|W| * ||X||`` score of every GQA group and MLP channel.

    Args:
        model: a causal LM (its mode is kept; run it in eval mode).
        input_ids: calibration tokens, shape ``(num_samples, seq_len)``, no padding.
        aggregation: how element scores combine within a unit: ``sum``, ``mean``, ``max``.
        batch_size: samples per forward pass.
        seed: unused.
        progress: show a progress bar.

    Returns:
        Per-layer fp32 scores: groups ``(num_kv_heads,)``, channels ``(intermediate_size,)``.
    """
    check_aggregation(aggregation)
    if input_ids is None or input_ids.numel() == 0:
        raise GQAPruneError("wanda importance needs calibration input_ids, got none")
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    projections = [proj for layer in layers for proj in adapter.prunable_projections(layer)]
    device = next(model.parameters()).device
    batches = input_ids.split(batch_size)
    with InputNormCollector(projections) as collector, torch.no_grad():
        for batch in tqdm(batches, desc="wanda activations", disable=not progress):
            model(input_ids=batch.to(device), use_cache=False)

    # parameter -> the norm of the input it multiplies: per input column for a weight,
    # sqrt(N) (the norm of a constant-1 input) for a bias.
    weight_norms: dict[int, torch.Tensor] = {}
    bias_norms: dict[int, float] = {}
    for proj in projections:
        weight_norms[id(proj.weight)] = collector.norms(proj)
        if proj.bias is not None:
            bias_norms[id(proj.bias)] = math.sqrt(collector.tokens[proj])

    def score_fn(param: torch.Tensor, kind: str) -> torch.Tensor:
        if kind == "bias":
            return param.detach().float().abs() * bias_norms[id(param)]
        return wanda_element_scores(param, weight_norms[id(param)])

    scores = layer_unit_scores(model, adapter, score_fn, aggregation)
    scores.check_finite("wanda importance")
    return scores
