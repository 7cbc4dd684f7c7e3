"""How important is each decoder layer? Three measures, higher = more important.

* ``removal``: increase of the mean calibration loss (token-weighted next-token cross
  entropy) when layer ``l`` is skipped, i.e. its output is its input. One recording pass
  stores the hidden states entering every layer; skipping ``l`` then only runs the suffix
  ``layers[l+1:] -> norm -> lm_head`` from ``inputs[l]`` (see :mod:`.decoder_stack`).
* ``activation``: mean L2 norm of a layer's output hidden states over tokens (the original
  research code's statistic).
* ``block_influence``: ShortGPT's BI (Men et al. 2024, eq. 1),
  ``BI_l = 1 - E_t[cos(x_t^l, x_t^{l+1})]`` between a layer's input and output.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from gqa_prune.analysis.decoder_stack import (
    OutputHead,
    input_device,
    next_token_nll,
    run_layers,
    trace_decoder_stack,
)
from gqa_prune.analysis.result import (
    FILE_NAME,
    LayerImportance,
    load_layer_importance,
    model_identity,
)
from gqa_prune.errors import GQAPruneError
from gqa_prune.models.adapters import get_adapter

log = logging.getLogger(__name__)

Method = Literal["removal", "activation", "block_influence"]
# method name -> scorer(model, input_ids (N, L), batch_size, progress) -> LayerImportance
_METHODS: dict[str, Callable[..., LayerImportance]] = {}


def _register(
    name: str,
) -> Callable[[Callable[..., LayerImportance]], Callable[..., LayerImportance]]:
    def wrap(fn: Callable[..., LayerImportance]) -> Callable[..., LayerImportance]:
        _METHODS[name] = fn
        return fn

    return wrap


def layer_importance_methods() -> tuple[str, ...]:
    """Names accepted by ``method``."""
    return tuple(_METHODS)


def _check_method(method: str) -> None:
    if method not in _METHODS:
        raise GQAPruneError(
            f"unknown layer importance method '{method}'; choose one of "
            f"{', '.join(layer_importance_methods())}"
        )


def _check_inputs(input_ids: torch.Tensor, batch_size: int) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)
        raise GQAPruneError(f"layer importance needs token ids of shape (N, L); got {shape}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise GQAPruneError(f"layer importance needs integer token ids; got {input_ids.dtype}")
    if input_ids.shape[0] < 1 or input_ids.shape[1] < 2:
        raise GQAPruneError(
            f"layer importance needs at least 1 sample of 2 tokens; got {tuple(input_ids.shape)}"
        )
    if batch_size < 1:
        raise GQAPruneError(f"batch_size must be >= 1; got {batch_size}")


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) inside; the previous mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _batches(input_ids: torch.Tensor, batch_size: int, device: torch.device) -> list[torch.Tensor]:
    return [b.to(device) for b in input_ids.split(batch_size)]


def _finish(
    model: nn.Module, method: str, scores: list[float], input_ids: torch.Tensor, extra: dict
) -> LayerImportance:
    bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
    if bad:
        raise GQAPruneError(
            f"layer importance ({method}): non-finite scores for layers {bad}; the model "
            "produces inf/NaN on the calibration data (try --dtype float32)"
        )
    result = LayerImportance(
        method=method,
        scores=tuple(float(s) for s in scores),
        num_samples=int(input_ids.shape[0]),
        seq_len=int(input_ids.shape[1]),
        model_identity=model_identity(model),
        num_layers=len(scores),
        extra=extra,
    )
    order = sorted(range(len(scores)), key=scores.__getitem__)
    log.info(
        "layer importance (%s) on %d x %d tokens: least important layers %s, most %s",
        method,
        result.num_samples,
        result.seq_len,
        order[:3],
        order[-3:][::-1],
    )
    return result


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 700.0))  # capped: exp(710) overflows a float


def _removal_result(
    model: nn.Module, input_ids: torch.Tensor, base_nll: float, nll: list[float], extra: dict
) -> LayerImportance:
    count = input_ids.shape[0] * (input_ids.shape[1] - 1)
    base_loss = base_nll / count
    losses = [x / count for x in nll]
    extra = {
        **extra,
        "base_loss": base_loss,
        "base_ppl": _ppl(base_loss),
        "loss_without_layer": losses,
        "ppl_without_layer": [_ppl(x) for x in losses],
        "num_tokens": count,
    }
    return _finish(model, "removal", [x - base_loss for x in losses], input_ids, extra)


@_register("removal")
@torch.no_grad()
def removal_importance(
    model: nn.Module, input_ids: torch.Tensor, batch_size: int = 4, progress: bool = True
) -> LayerImportance:
    """Loss increase when each layer is skipped, running only the suffix after it.

    Per batch: one recording forward stores the hidden states entering each layer
    (``num_layers x B x L x H`` values in the model dtype, one batch at a time); then for
    each ``l`` the suffix ``layers[l+1:] -> norm -> lm_head`` runs from ``inputs[l]``.
    That is ``n(n-1)/2`` layer calls per batch instead of the naive ``n(n-1)``.

    Args:
        model: causal LM (Llama/Qwen2 family).
        input_ids: calibration token ids without padding, shape (N, L).
        batch_size: samples per forward pass.
        progress: show a progress bar.

    Returns:
        ``scores[l] = loss_without_layer[l] - base_loss``; ``extra`` holds the base loss and
        perplexity and the loss / perplexity with each layer skipped.
    """
    _check_inputs(input_ids, batch_size)
    layers = get_adapter(model).decoder_layers(model)
    head = OutputHead(model)
    n_layers = len(layers)
    base_nll, nll = 0.0, [0.0] * n_layers
    batches = _batches(input_ids, batch_size, input_device(model))
    bar = tqdm(
        total=len(batches) * n_layers, desc="layer importance (removal)", disable=not progress
    )
    with _eval_mode(model), bar:
        for ids in batches:
            trace = trace_decoder_stack(model, ids)
            base_nll += next_token_nll(head, trace.output, ids)
            for skipped in range(n_layers):
                # Skipping layer l: layer l+1 receives what layer l received.
                hidden = run_layers(layers, trace.calls, trace.inputs[skipped], skipped + 1)
                nll[skipped] += next_token_nll(head, hidden, ids)
                bar.update(1)
            del trace
    return _removal_result(model, input_ids, base_nll, nll, {"implementation": "suffix"})


@torch.no_grad()
def removal_importance_naive(
    model: nn.Module, input_ids: torch.Tensor, batch_size: int = 4, progress: bool = True
) -> LayerImportance:
    """Reference for :func:`removal_importance`: one full forward per skipped layer.

    The skip is a forward hook that hands the layer's input on as its output, in the
    output's own structure (tensor or tuple), so it works across transformers versions.
    Same arguments and result as :func:`removal_importance`; up to twice as slow.
    """
    _check_inputs(input_ids, batch_size)
    layers = get_adapter(model).decoder_layers(model)
    n_layers = len(layers)

    def skip(module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
        hidden = args[0] if args else kwargs["hidden_states"]
        if isinstance(output, tuple):
            return (hidden, *output[1:])
        return hidden

    def loss_sum(ids: torch.Tensor) -> float:
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        targets = ids[:, 1:].reshape(-1)
        return float(
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, reduction="sum")
        )

    base_nll, nll = 0.0, [0.0] * n_layers
    batches = _batches(input_ids, batch_size, input_device(model))
    bar = tqdm(total=len(batches) * n_layers, desc="layer importance (naive)", disable=not progress)
    with _eval_mode(model), bar:
        for ids in batches:
            base_nll += loss_sum(ids)
            for skipped, layer in enumerate(layers):
                handle = layer.register_forward_hook(skip, with_kwargs=True)
                try:
                    nll[skipped] += loss_sum(ids)
                finally:
                    handle.remove()
                bar.update(1)
    return _removal_result(model, input_ids, base_nll, nll, {"implementation": "naive"})


def _boundary_statistic(
    model: nn.Module,
    input_ids: torch.Tensor,
    batch_size: int,
    progress: bool,
    method: str,
    per_token: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> LayerImportance:
    """Mean over tokens of ``per_token(layer_input, layer_output)`` (fp32), for each layer."""
    _check_inputs(input_ids, batch_size)
    n_layers = len(get_adapter(model).decoder_layers(model))
    sums = torch.zeros(n_layers, dtype=torch.float64)
    batches = _batches(input_ids, batch_size, input_device(model))
    with _eval_mode(model):
        for ids in tqdm(batches, desc=f"layer importance ({method})", disable=not progress):
            trace = trace_decoder_stack(model, ids)
            for layer in range(n_layers):
                x_in = trace.inputs[layer].float()
                x_out = trace.layer_output(layer).float()
                sums[layer] += per_token(x_in, x_out).double().sum().cpu()
            del trace
    scores = (sums / input_ids.numel()).tolist()
    return _finish(model, method, scores, input_ids, {})


@_register("activation")
@torch.no_grad()
def activation_importance(
    model: nn.Module, input_ids: torch.Tensor, batch_size: int = 4, progress: bool = True
) -> LayerImportance:
    """Mean L2 norm of each layer's output hidden states over all N*L tokens.

    The original research code's statistic; the last layer's output is taken before the
    final norm. Arguments as in :func:`removal_importance`.
    """
    return _boundary_statistic(
        model,
        input_ids,
        batch_size,
        progress,
        "activation",
        lambda x_in, x_out: x_out.norm(dim=-1),
    )


@_register("block_influence")
@torch.no_grad()
def block_influence_importance(
    model: nn.Module, input_ids: torch.Tensor, batch_size: int = 4, progress: bool = True
) -> LayerImportance:
    """ShortGPT Block Influence: ``1 - cos(input, output)`` of each layer, mean over tokens.

    A layer that barely rotates the residual stream (BI near 0) is nearly redundant.
    Arguments as in :func:`removal_importance`.
    """
    return _boundary_statistic(
        model,
        input_ids,
        batch_size,
        progress,
        "block_influence",
        lambda x_in, x_out: 1.0 - F.cosine_similarity(x_in, x_out, dim=-1),
    )


def compute_layer_importance(
    model: nn.Module,
    input_ids: torch.Tensor,
    method: Method = "removal",
    batch_size: int = 4,
    progress: bool = True,
) -> LayerImportance:
    """Score every decoder layer of ``model`` on calibration tokens; higher = more important.

    Args:
        model: causal LM (Llama/Qwen2 family).
        input_ids: calibration token ids without padding, shape (N, L).
        method: ``removal`` (loss increase when the layer is skipped), ``activation``
            (mean output L2 norm) or ``block_influence`` (ShortGPT, 1 - cos(in, out)).
        batch_size: samples per forward pass.
        progress: show a progress bar.

    Raises:
        GQAPruneError: unknown method, malformed ``input_ids``, or non-finite scores.
    """
    _check_method(method)
    return _METHODS[method](model, input_ids, batch_size=batch_size, progress=progress)


class LayerImportanceAnalyzer:
    """Public face kept from the original research code.

    Example::

        result = LayerImportanceAnalyzer(model, method="removal").analyze(calib_ids)
        result.save(out_dir / "layer_importance_config.json")
    """

    def __init__(
        self,
        model: nn.Module,
        method: Method = "removal",
        batch_size: int = 4,
        progress: bool = True,
    ) -> None:
        _check_method(method)
        if batch_size < 1:
            raise GQAPruneError(f"batch_size must be >= 1; got {batch_size}")
        self.model, self.method, self.batch_size, self.progress = (
            model,
            method,
            batch_size,
            progress,
        )

    def analyze(self, input_ids: torch.Tensor) -> LayerImportance:
        """Scores of every layer on ``input_ids`` of shape (N, L)."""
        return compute_layer_importance(
            self.model, input_ids, self.method, batch_size=self.batch_size, progress=self.progress
        )


__all__ = [
    "FILE_NAME",
    "LayerImportance",
    "LayerImportanceAnalyzer",
    "activation_importance",
    "block_influence_importance",
    "compute_layer_importance",
    "layer_importance_methods",
    "load_layer_importance",
    "model_identity",
    "removal_importance",
    "removal_importance_naive",
]
