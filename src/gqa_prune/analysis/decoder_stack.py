"""Run a decoder stack layer by layer, independently of the transformers version.

transformers changes what a model passes to its decoder layers (causal masks, rotary
position embeddings, cache objects) and what a layer returns (a tuple in 4.x, a tensor in
5.x). Rather than rebuild those arguments, we *record* them from one ordinary forward with
forward pre-hooks (``with_kwargs=True``, public torch API) and replay them::

    ids -> embed -> [layer 0] -> [layer 1] -> ... -> [layer n-1] -> norm -> lm_head -> logits
                 ^            ^                   ^             ^
             inputs[0]    inputs[1]          inputs[n-1]      output

With the boundary states stored, "the network without layer l" is the *suffix*
``layers[l+1:] -> norm -> lm_head`` applied to ``inputs[l]``: no prefix is recomputed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gqa_prune.errors import GQAPruneError
from gqa_prune.models.adapters import get_adapter

# Largest logits block materialised at once (elements; 2**26 fp32 = 256 MiB).
_LOGITS_BUDGET = 2**26


@dataclass(frozen=True)
class LayerCall:
    """The arguments a model passed to one decoder layer, besides the hidden states."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass(frozen=True)
class LayerCalls:
    """The recorded call of every decoder layer for one batch (``calls[layer]``).

    Layers of one attention type share the same mask and rotary tensors, so this holds
    references, not copies.
    """

    calls: tuple[LayerCall, ...]

    def of(self, layer: int) -> LayerCall:
        return self.calls[layer]


@dataclass(frozen=True)
class StackTrace:
    """Boundary hidden states of one batch, and how each layer was called.

    Attributes:
        inputs: ``inputs[l]`` are the hidden states entering layer ``l``, shape (B, L, H).
        calls: the recorded call arguments of each layer (masks, position embeddings ...).
        output: hidden states leaving the last layer (before the final norm), (B, L, H).
    """

    inputs: list[torch.Tensor]
    calls: list[LayerCall]
    output: torch.Tensor

    def layer_output(self, layer: int) -> torch.Tensor:
        """Hidden states leaving ``layer`` (= those entering ``layer + 1``), (B, L, H)."""
        return self.inputs[layer + 1] if layer + 1 < len(self.inputs) else self.output


class StopForward(Exception):
    """Raised by a hook to end the recording forward before the final norm and lm_head."""


def split_layer_args(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[torch.Tensor, LayerCall]:
    """Split a decoder layer's call (as seen by a pre-hook) into hidden states + the rest."""
    if args:
        return args[0], LayerCall(tuple(args[1:]), dict(kwargs))
    if "hidden_states" in kwargs:
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        return kwargs["hidden_states"], LayerCall((), rest)
    raise GQAPruneError(
        "could not find the hidden states among a decoder layer's arguments "
        f"(keyword arguments: {sorted(kwargs)}); this model family is not supported"
    )


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden states in a decoder layer's output: a tensor, or a tuple's first item."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise GQAPruneError(
        f"a decoder layer returned {type(output).__name__}; expected a tensor or a tuple "
        "whose first item is the hidden states"
    )


class _CallRecorder(nn.Module):
    """Stands in for one decoder layer while calls are recorded: records, passes through."""

    def __init__(
        self,
        sink: list[LayerCall],
        states: list[torch.Tensor] | None,
        last: bool,
        host: torch.device | str,
    ) -> None:
        super().__init__()
        self.sink, self.states, self.last, self.host = sink, states, last, host

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        hidden, call = split_layer_args(args, kwargs)
        self.sink.append(call)
        if self.states is not None:
            self.states.append(hidden.detach().to(self.host))
        if self.last:
            raise StopForward
        return hidden


class Replay(nn.Module):
    """Stands in for an attention or MLP block whose outputs are already known.

    Call ``i`` returns ``outputs[i]`` (moved to the input's device) without computing
    anything: as ``(output, None)`` when ``pair`` (what attention blocks return), else the
    tensor (an MLP block). The engine uses it to run the rest of a layer (norms, residual
    adds) after it has computed a block's pruned outputs from recorded projection inputs.

    Raises:
        GQAPruneError: more calls than outputs, or an output of another shape than the
            hidden states it stands in for.
    """

    def __init__(self, outputs: Sequence[torch.Tensor], pair: bool) -> None:
        super().__init__()
        self.outputs, self.pair, self.calls = outputs, pair, 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.calls >= len(self.outputs):
            raise GQAPruneError(f"a replayed block was called more than {len(self.outputs)} times")
        out = self.outputs[self.calls].to(hidden.device)
        self.calls += 1
        if out.shape != hidden.shape:
            raise GQAPruneError(
                f"replayed block output has shape {tuple(out.shape)}, its input "
                f"{tuple(hidden.shape)}; the layer was not called in the recorded order"
            )
        return (out, None) if self.pair else out


@contextmanager
def layers_replaced(model: nn.Module, modules: nn.ModuleList) -> Iterator[nn.ModuleList]:
    """The model's decoder layer list is ``modules`` inside the block; yields the real one."""
    path = get_adapter(model).layers_attr
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    layers = getattr(parent, attr)
    setattr(parent, attr, modules)
    try:
        yield layers
    finally:
        setattr(parent, attr, layers)


@torch.no_grad()
def record_layer_calls(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    device: torch.device | str,
    host: torch.device | str,
) -> tuple[list[torch.Tensor], list[LayerCalls]]:
    """Hidden states entering layer 0 (on ``host``) and every layer's call, per batch.

    Runs the model's own forward with pass-through stand-ins for the decoder layers, so
    embeddings, masks and rotary tables are built by the model itself at the cost of the
    embedding lookup alone: no layer computes. Every layer's call is recorded (not only
    layer 0's), since a family may pass layers different masks (sliding-window layers); they
    are mostly shared tensors (one mask per layer type, one rotary table). The last stand-in
    stops the forward before the final norm and ``lm_head``.

    Raises:
        GQAPruneError: the forward did not call every decoder layer once per batch.
    """
    n = len(get_adapter(model).decoder_layers(model))
    states: list[torch.Tensor] = []
    sinks: list[list[LayerCall]] = [[] for _ in range(n)]
    stand_ins = nn.ModuleList(
        _CallRecorder(sinks[i], states if i == 0 else None, i == n - 1, host) for i in range(n)
    )
    with layers_replaced(model, stand_ins):
        for batch in batches:
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except StopForward:
                pass
    if any(len(sink) != len(batches) for sink in sinks):
        raise GQAPruneError(
            "the model's forward did not call each decoder layer once per batch; layer-wise "
            "pruning needs a Llama-style decoder"
        )
    return states, [LayerCalls(tuple(sink[b] for sink in sinks)) for b in range(len(batches))]


def input_device(model: nn.Module) -> torch.device:
    """Device of the input embeddings, where token ids must go."""
    hf_model: Any = model  # a transformers PreTrainedModel; nn.Module lacks the method
    return hf_model.get_input_embeddings().weight.device


def trace_decoder_stack(model: nn.Module, input_ids: torch.Tensor) -> StackTrace:
    """One ordinary forward of ``model`` that records every layer's input and arguments.

    The forward stops after the last decoder layer (the final norm and lm_head do not run).

    Args:
        model: causal LM whose decoder layers the adapter can find.
        input_ids: token ids, shape (B, L), already on the model's device.
    """
    layers = get_adapter(model).decoder_layers(model)
    inputs: list[torch.Tensor] = []
    calls: list[LayerCall] = []
    output: list[torch.Tensor] = []

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden, call = split_layer_args(args, kwargs)
        inputs.append(hidden)
        calls.append(call)

    def stop(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        output.append(hidden_of(out))
        raise StopForward

    handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
    handles.append(layers[-1].register_forward_hook(stop, with_kwargs=True))
    try:
        model(input_ids=input_ids, use_cache=False)
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if len(inputs) != len(layers) or not output:
        raise GQAPruneError(
            f"the model's forward called {len(inputs)} of its {len(layers)} decoder layers; "
            "layer importance needs every layer to run once per forward"
        )
    return StackTrace(inputs=inputs, calls=calls, output=output[0])


def run_layers(
    layers: nn.ModuleList | Sequence[nn.Module],
    calls: Sequence[LayerCall],
    hidden: torch.Tensor,
    start: int,
) -> torch.Tensor:
    """Run ``layers[start:]`` on ``hidden`` with the recorded arguments; (B, L, H) -> (B, L, H)."""
    for layer, call in zip(layers[start:], calls[start:], strict=True):
        hidden = hidden_of(layer(hidden, *call.args, **call.kwargs))
    return hidden


class OutputHead:
    """Final norm, LM head and the family's final soft-cap: (B, L, H) -> (B, L, V) logits.

    Gemma 2/3 bound the logits as ``c * tanh(logits / c)`` after the LM head (``c`` from the
    config, through the adapter); without it the losses here would not be the model's.
    """

    def __init__(self, model: nn.Module) -> None:
        self.norm = final_norm(model)
        self.softcap = get_adapter(model).final_logit_softcap(model)
        hf_model: Any = model  # a transformers PreTrainedModel; nn.Module lacks the method
        lm_head = hf_model.get_output_embeddings()
        if lm_head is None:
            raise GQAPruneError(
                f"{type(model).__name__} has no output embeddings (lm_head); layer importance "
                "needs a causal LM (AutoModelForCausalLM), not a bare decoder"
            )
        self.lm_head: Any = lm_head

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.norm(hidden))
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied after the last decoder layer (its path comes from the adapter)."""
    return get_adapter(model).final_norm(model)


def next_token_nll(head: OutputHead, hidden: torch.Tensor, input_ids: torch.Tensor) -> float:
    """Sum over all predicted tokens of the next-token NLL, accumulated in fp32/fp64.

    Position ``t`` predicts token ``t + 1``; logits are built a few rows at a time so a
    large vocabulary never needs the full (B, L, V) block.

    Args:
        head: final norm + LM head.
        hidden: last-layer hidden states, shape (B, L, H).
        input_ids: token ids, shape (B, L); the targets are ``input_ids[:, 1:]``.
    """
    n, length, _ = hidden.shape
    vocab = int(head.lm_head.weight.shape[0])
    rows = max(1, _LOGITS_BUDGET // max(1, (length - 1) * vocab))
    total = 0.0
    for start in range(0, n, rows):
        logits = head(hidden[start : start + rows, :-1]).float()
        targets = input_ids[start : start + rows, 1:]
        nll = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1), reduction="sum")
        total += float(nll)
    return total
