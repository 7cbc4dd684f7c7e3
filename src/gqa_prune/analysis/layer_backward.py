"""A backward pass one decoder layer at a time, over any layer walk (resident or streamed).

For calibration batches ``b`` with a scalar loss ``L_b`` on the last hidden states, the chain
rule through the decoder stack ``h_{i+1} = f_i(h_i)`` is run layer by layer from the top::

    g_n = dL_b/dh_n                       (the loss head on the kept last states)
    g_i = (d f_i / d h_i)^T g_{i+1}       (layer i again, with grad, on its kept input h_i)
    dL_b/dtheta_i = (d f_i / d theta_i)^T g_{i+1}   (only for the parameters asked for)

so only one layer (and one batch of its activations) is ever on the device, as in the
forward. Cost: two forwards and one backward of every layer per batch (the forward that
keeps the inputs, and the forward with grad before each layer's backward); host memory for
every layer's input, ``num_layers x N x L x H`` in the model dtype (Llama-3-8B, 32 x 128
tokens, bf16: 1 GiB), plus one gradient per batch. Used by the gradient-weighted sensitivity
(:mod:`gqa_prune.compensation.sensitivity`, the gradients at each layer's output) and the
streamed Taylor scores (:mod:`gqa_prune.streaming.scores`, the projections' weight
gradients); weights are never changed and every ``requires_grad`` flag is restored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from gqa_prune.errors import GQAPruneError

# (hidden (B, L, H) on the device with grad, input ids (B, L)) -> scalar loss of the batch
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def layerwise_backward(
    walk: Any,
    batches: Sequence[torch.Tensor],
    loss: LossFn,
    at_output: Callable[[int, list[torch.Tensor]], None] | None = None,
    params: Callable[[nn.Module], list[nn.Parameter]] | None = None,
    at_params: Callable[[int, nn.Module, list[nn.Parameter], list[torch.Tensor]], None]
    | None = None,
    what: str = "backward",
    progress: bool = False,
) -> None:
    """Run the layer-wise backward above, handing the gradients to callbacks.

    Args:
        walk: a ``LayerWalk`` (``gqa_prune.compensation.sequential``): ``capture``,
            ``layer(i)``, ``run``, ``num_layers``, ``device``, ``host``.
        batches: token ids, one ``(B, L)`` tensor per batch.
        loss: the batch's loss from the last hidden states (the final norm and head are
            the caller's choice: a sum or a mean of the next-token NLL, ...).
        at_output: called as ``at_output(i, grads)`` with ``dL_b/dh`` at layer ``i``'s
            output for every batch (host tensors, ``(B, L, H)``), from the top layer down.
        params: the parameters of a layer to differentiate (None = none).
        at_params: called per batch as ``at_params(i, layer, params, grads)`` with
            ``params(layer)`` (asked once per layer) and their gradients, in that order, while
            ``layer`` is on the device.
        what: names the caller in the error for a non-finite loss.
        progress: tqdm bars.

    Raises:
        GQAPruneError: the calibration loss of a batch is not finite.
    """
    states, calls = walk.capture(list(batches))
    n = walk.num_layers
    inputs: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for i in tqdm(range(n), desc=f"{what} (forward)", disable=not progress):
            inputs.append(list(states))
            with walk.layer(i) as layer:
                for b, call in enumerate(calls):
                    states[b] = walk.run(layer, states[b], call).to(walk.host)
    grads = [_loss_gradient(loss, states[b], ids, walk, what, b) for b, ids in enumerate(batches)]
    del states
    for i in tqdm(reversed(range(n)), total=n, desc=what, disable=not progress):
        if at_output is not None:
            at_output(i, grads)
        if i == 0 and params is None:
            break
        with walk.layer(i) as layer:
            wanted = [] if params is None else list(params(layer))
            everything = list(layer.parameters())
            flags = [p.requires_grad for p in everything]
            asked = {id(p) for p in wanted}
            for p in everything:
                p.requires_grad_(id(p) in asked)
            try:
                for b, call in enumerate(calls):
                    x = inputs[i][b].to(walk.device)
                    if i > 0:
                        x.requires_grad_(True)
                    with torch.enable_grad():
                        y = walk.run(layer, x, call)
                        wrt = [*wanted, x] if i > 0 else wanted
                        got = torch.autograd.grad(y, wrt, grad_outputs=grads[b].to(y.device))
                    if at_params is not None and wanted:
                        at_params(i, layer, wanted, list(got[: len(wanted)]))
                    if i > 0:
                        grads[b] = got[-1].to(walk.host)
                    del got, y
            finally:
                for p, flag in zip(everything, flags, strict=True):
                    p.requires_grad_(flag)
        inputs[i] = []


def _loss_gradient(
    loss: LossFn, hidden: torch.Tensor, ids: torch.Tensor, walk: Any, what: str, b: int
) -> torch.Tensor:
    """``dL_b/dh`` at the last hidden states, on the host."""
    hidden = hidden.to(walk.device).requires_grad_(True)
    with torch.enable_grad():
        value = loss(hidden, ids)
        if not torch.isfinite(value):
            raise GQAPruneError(
                f"{what}: calibration loss is {value.item()} at batch {b}; use --dtype "
                "float32 or check the model weights"
            )
        (grad,) = torch.autograd.grad(value, hidden)
    return grad.to(walk.host)
