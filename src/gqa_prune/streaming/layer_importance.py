"""Layer importance with one decoder layer on the device at a time.

- ``activation`` and ``block_influence``: one streaming forward; the statistic of layer
  ``l`` is taken from its input and output while it is on the device.
- ``removal``: one pass over the layers that carries, besides the normal hidden states,
  one *skip variant* per layer already passed: variant ``l`` is the network without layer
  ``l``. When layer ``j`` is on the device it runs the normal stream and every variant
  ``l < j``; variant ``j`` starts as the input of layer ``j`` (skipping it = passing the
  input on)::

      layer j on the device:   base  -> layer_j(base)
                               var_l -> layer_j(var_l)   for l < j
                               var_j =  base (before layer_j)

  That is ``n + n(n-1)/2`` layer calls per batch, like the in-memory suffix method, but
  every layer is loaded once. The host holds ``n + 1`` hidden-state streams of
  ``N x L x H`` (N x L calibration tokens, H hidden size).

Scores equal :func:`gqa_prune.analysis.compute_layer_importance` (same sums, same order).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gqa_prune.analysis.decoder_stack import next_token_nll
from gqa_prune.analysis.layer_importance import (
    LayerImportance,
    _check_inputs,
    _check_method,
    _finish,
    _removal_result,
)
from gqa_prune.streaming.executor import LayerStreamer


def streaming_layer_importance(
    streamer: LayerStreamer,
    input_ids: torch.Tensor,
    method: str = "removal",
    batch_size: int = 4,
    progress: bool = True,
) -> LayerImportance:
    """:func:`~gqa_prune.analysis.compute_layer_importance` with one layer on the device.

    Args:
        streamer: holds the model.
        input_ids: calibration token ids without padding, shape (N, L).
        method: ``removal``, ``activation`` or ``block_influence``.
        batch_size: samples per batch.
        progress: show a progress bar.
    """
    _check_method(method)
    _check_inputs(input_ids, batch_size)
    if method == "removal":
        return _removal(streamer, input_ids, batch_size, progress)
    per_token: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    if method == "activation":

        def per_token(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
            return x_out.norm(dim=-1)

    else:

        def per_token(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
            return 1.0 - F.cosine_similarity(x_in, x_out, dim=-1)

    states, calls = streamer.capture(list(input_ids.split(batch_size)))
    sums = torch.zeros(streamer.num_layers, dtype=torch.float64)
    with torch.no_grad():
        for i in tqdm(range(streamer.num_layers), desc=f"{method}", disable=not progress):
            with streamer.layer(i) as layer:
                for b, call in enumerate(calls):
                    x_in = states[b].to(streamer.device)
                    x_out = streamer.run(layer, x_in, call)
                    sums[i] += per_token(x_in.float(), x_out.float()).double().sum().cpu()
                    states[b] = x_out.to(streamer.host)
    scores = (sums / input_ids.numel()).tolist()
    return _finish(streamer.model, method, scores, input_ids, {"streaming": True})


@torch.no_grad()
def _removal(
    streamer: LayerStreamer, input_ids: torch.Tensor, batch_size: int, progress: bool
) -> LayerImportance:
    batches = list(input_ids.split(batch_size))
    base, calls = streamer.capture(batches)
    n = streamer.num_layers
    variants: list[list[torch.Tensor]] = []  # variants[l][b]: the stream without layer l
    bar = tqdm(total=n, desc="removal (skip variants)", disable=not progress)
    with bar:
        for j in range(n):
            with streamer.layer(j) as layer:
                for b, call in enumerate(calls):
                    for stream in variants:
                        stream[b] = streamer.run(layer, stream[b], call).to(streamer.host)
                variants.append(list(base))  # skip layer j: its input passes on unchanged
                for b, call in enumerate(calls):
                    base[b] = streamer.run(layer, base[b], call).to(streamer.host)
            bar.update(1)
    base_nll, nll = 0.0, [0.0] * n
    for b, ids in enumerate(batches):
        ids = ids.to(streamer.device)
        base_nll += next_token_nll(streamer.head, base[b].to(streamer.device), ids)
        for skipped in range(n):
            nll[skipped] += next_token_nll(
                streamer.head, variants[skipped][b].to(streamer.device), ids
            )
    extra = {"implementation": "streaming skip variants"}
    return _removal_result(streamer.model, input_ids, base_nll, nll, extra)
