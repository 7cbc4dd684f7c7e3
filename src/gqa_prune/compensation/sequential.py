"""The layer-wise pruning engine: apply a PruningPlan one decoder layer at a time, repairing
what each layer loses.

Layer ``l`` is calibrated on the outputs of layers ``0..l-1`` *as already pruned and
compensated*::

    ids -> embed -> h0 -> [layer 0: stats, select, slice, refit] -> h1 -> [layer 1: ...] ...
                    ^ recorded once              run the pruned layer ^ (replaces h0)

One engine serves both placements (:class:`LayerWalk`): every layer resident on the model's
device (:class:`ResidentLayers`, the in-memory case) or one layer at a time on the device with
the rest parked in RAM or on disk (``gqa_prune.streaming.LayerStreamer``). Per layer, at most
four passes of that one layer over the calibration set:

0. (``dense`` or blended targets only) the dense layer on the *dense* model's hidden states, carried
   beside the pruned ones: records the dense outputs ``Y`` of ``o_proj`` and ``down_proj``
   (the refit targets, :mod:`.solve`) and advances the dense stream;
1. (when the layer loses GQA groups, unless all go and ``lstsq`` has nothing to refit) the
   dense layer on the pruned stream up to ``o_proj``'s input (attention statistics; the
   forward stops there, so the MLP is not computed; the inputs are kept); select and slice
   the GQA groups, refit ``o_proj``'s kept columns (or add FLAP's bias); the pruned block's
   outputs are then the refitted ``o_proj`` on the kept columns of those inputs;
2. (when it loses MLP channels) the layer up to ``down_proj``'s input, its attention block
   replaced by those outputs (:class:`~gqa_prune.analysis.decoder_stack.Replay`; computed
   and recorded here when attention was not cut): MLP statistics, inputs kept; slice the MLP
   channels, refit ``down_proj``'s kept columns (or add the bias), and its outputs likewise;
3. the layer with both blocks replayed (norms and residual adds only), whose outputs become
   the next layer's calibration inputs.

So every block computes once per batch (q/k/v and the attention scores in pass 1, gate/up
in pass 2), and the refitted projections once more on their recorded inputs.

Targets: ``local`` refits each projection to its own dense weights on the pruned inputs
(``X W^T``), so the error arriving from below is left as it is; ``dense`` refits to the
dense model's outputs (``Y = X_d W^T``), so every cut layer also corrects that drift; a
number ``beta`` in [0, 1] blends the two, ``(1 - beta) X W^T + beta Y`` (:mod:`.solve`; 0 is
``local``, 1 is ``dense``): part of the drift is corrected, the rest left to the layers above.
Target norm ``local`` keeps each token's dense target direction but gives it the size of the
layer's own output (:mod:`.solve`).

Memory: only the current boundary hidden states (``N x L x hidden``, model dtype; twice with
``dense`` or a blend, plus the two recorded targets of the current layer,
``2 x N x L x hidden``), the current layer's recorded projection inputs and block outputs, and
one Gram matrix are held,
plus the recorded layer arguments (masks, rotary tables) per batch (streamed: the states and
recordings rest on the host, one batch at a time on the device).
Cost per layer for Llama-3-8B (hidden 4096, 32 Q heads x 128, MLP 14336),
64 x 128 calibration tokens, bf16, 25% of the MLP channels removed (|S| = 10752 kept):

    what                                   size / work
    boundary hidden states (bf16)          64 x 128 x 4096 x 2 B         =  64 MiB
    o_proj Gram (fp32)                     4096^2 x 4 B                  =  64 MiB
    down_proj Gram (fp32)                  14336^2 x 4 B                 = 784 MiB (822 MB)
    dense targets (bf16): dense stream, Y_o, Y_down       3 x 64 MiB
    recorded o_proj inputs (bf16)          64 x 128 x 4096 x 2 B         =  64 MiB
    recorded down_proj inputs (bf16)       64 x 128 x 14336 x 2 B        = 224 MiB
    replayed block outputs (bf16)          2 x 64 x 128 x 4096 x 2 B     = 128 MiB
    cross product C (fp32)                 14336 x 4096 x 4 B            = 224 MiB
    ridge solve (fp64, in-place Cholesky)  |S|^2 x 8 B + |S| x 4096 x 8 B x 2
                                           measured peak 2.6 GiB above the Gram matrix
    Gram products (fp32, lower blocks)     ~N I^2 = 1.7 TFLOP per layer (N = 8192 tokens)
    Cholesky + solve (fp64)                |S|^3/3 + 2 |S|^2 x 4096 = 1.4 TFLOP per layer
    layer forwards                         ~1 pass of the layer over the calibration set
                                           (each block once, plus o_proj and down_proj
                                           again on their kept inputs)
    --selection repair (instead of the     H^-1 (fp64) 14336^2 x 8 B = 1.6 GiB + W' (fp64)
      down_proj solve; .selection)         0.47 GiB (+ 1.6 GiB transient); ~2 n^3 = 5.8 TFLOP

Measured on one CPU core (a 14336-wide random layer): Gram of 2048 tokens 16-25 s, the solve
50-100 s. On a GPU the Gram products take well under a second; the fp64 solve about a second
on data-centre GPUs and a few seconds on consumer GPUs (1/64-rate fp64). Everything is freed
after each layer. The attention refit is small (4096 features).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from gqa_prune.analysis.decoder_stack import (
    LayerCall,
    LayerCalls,
    Replay,
    StopForward,
    hidden_of,
    input_device,
    record_layer_calls,
)
from gqa_prune.compensation.selection import Selection, check_selection, select_kept_units
from gqa_prune.compensation.solve import blend_cross, removed_mean_contribution, ridge_refit
from gqa_prune.compensation.stats import InputStats
from gqa_prune.errors import GQAPruneError
from gqa_prune.models.adapters import ArchitectureAdapter, get_adapter
from gqa_prune.models.geometry import GQAGeometry
from gqa_prune.plan import LayerPlan, PruningPlan
from gqa_prune.slicing import (
    attention_cut,
    check_pruned_model,
    group_rows,
    prune_attention_by_gqa_groups,
    prune_mlp_channels,
    slice_layer_,
    update_config_,
)

log = logging.getLogger(__name__)

Compensation = Literal["none", "lstsq", "bias"]
COMPENSATIONS: tuple[str, ...] = ("none", "lstsq", "bias")
Target = Literal["local", "dense"]
# named targets; --compensation_target also takes a blend, a number in [0, 1]
TARGETS: tuple[str, ...] = ("local", "dense")
DEFAULT_TARGET = "local"
TargetNorm = Literal["dense", "local"]
# the size of each token's dense target: as the dense model has it, or the pruned layer's own.
# local: a blend (0.25) then beats the local target on Gemma-3-270M's test windows (61.30 vs
# 61.80; dense size 66.82) and stays within 2% of the dense size on SmolLM2-135M
# (docs/benchmarks.md, ninth round)
TARGET_NORMS: tuple[str, ...] = ("dense", "local")
DEFAULT_TARGET_NORM = "local"
# lam = DEFAULT_DAMP * mean(diag(G_SS)); chosen on SmolLM2-135M (bench/bench_compensation.py)
DEFAULT_DAMP = 0.1
# Config flag read by the shipped modeling code: o_proj and down_proj of every layer carry a
# bias (FLAP's compensation), even where the family's config flags would build none.
OUTPUT_BIAS_FLAG = "layer_output_bias"


def target_blend(target: str) -> float:
    """The dense outputs' share ``beta`` of a refit target: ``local`` = 0, ``dense`` = 1, or
    the number itself (``"0.25"``).

    Raises:
        GQAPruneError: neither a named target nor a number in [0, 1].
    """
    named = {"local": 0.0, "dense": 1.0}
    if target in named:
        return named[target]
    try:
        beta = float(target)
    except (TypeError, ValueError):
        beta = float("nan")
    if not 0.0 <= beta <= 1.0:  # also NaN
        raise GQAPruneError(
            f"unknown compensation target '{target}'; choose local, dense or a number in "
            f"[0, 1] (the dense outputs' share of the target, e.g. 0.25)"
        )
    return beta


def check_compensation(
    compensation: str,
    damp: float,
    target: str = DEFAULT_TARGET,
    target_norm: str = DEFAULT_TARGET_NORM,
) -> None:
    """Raise a GQAPruneError for an unknown compensation, target or target norm, or a
    non-positive damp."""
    if compensation not in COMPENSATIONS:
        raise GQAPruneError(
            f"unknown compensation '{compensation}'; choose one of {', '.join(COMPENSATIONS)}"
        )
    if not damp > 0:
        raise GQAPruneError(f"compensation damp must be > 0 (e.g. {DEFAULT_DAMP}), got {damp}")
    if target_norm not in TARGET_NORMS:
        raise GQAPruneError(
            f"unknown compensation target norm '{target_norm}'; choose one of "
            f"{', '.join(TARGET_NORMS)}"
        )
    if target_blend(target) > 0 and compensation != "lstsq":
        raise GQAPruneError(
            f"--compensation_target {target} refits to the dense model's outputs; it needs "
            f"--compensation lstsq (got '{compensation}')"
        )


class LayerWalk(Protocol):
    """Where the decoder layers live while the engine walks them (in order).

    ``states`` rest on ``host``; :meth:`run` takes host or device hidden states and returns
    device ones. Implemented by :class:`ResidentLayers` and ``streaming.LayerStreamer``.
    """

    model: nn.Module
    adapter: ArchitectureAdapter
    device: torch.device
    host: torch.device

    @property
    def num_layers(self) -> int: ...

    def layer(self, index: int, changed: bool = False) -> Any:
        """A context manager: layer ``index`` on the device inside the block."""
        ...

    def capture(
        self, batches: Sequence[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[LayerCalls]]: ...

    def run(
        self, layer: nn.Module, hidden: torch.Tensor, call: LayerCall | LayerCalls
    ) -> torch.Tensor: ...


class ResidentLayers:
    """Every decoder layer resident on the model's device: the in-memory :class:`LayerWalk`."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.adapter = get_adapter(model)
        self.layers = self.adapter.decoder_layers(model)
        self.device = self.host = input_device(model)
        self._index = {id(layer): i for i, layer in enumerate(self.layers)}

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @contextmanager
    def layer(self, index: int, changed: bool = False) -> Iterator[nn.Module]:
        yield self.layers[index]

    def capture(
        self, batches: Sequence[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[LayerCalls]]:
        return record_layer_calls(self.model, batches, self.device, self.host)

    def run(
        self, layer: nn.Module, hidden: torch.Tensor, call: LayerCall | LayerCalls
    ) -> torch.Tensor:
        if isinstance(call, LayerCalls):
            call = call.of(self._index[id(layer)])
        return _run_layer(layer, hidden.to(self.device), call)


class _OnDevice(Sequence[torch.Tensor]):
    """Host tensors seen through ``.to(device)`` one at a time (never all on the device)."""

    def __init__(self, tensors: list[torch.Tensor], device: torch.device) -> None:
        self.tensors, self.device = tensors, device

    def __len__(self) -> int:
        return len(self.tensors)

    def __getitem__(self, i: Any) -> Any:
        return self.tensors[i].to(self.device)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (t.to(self.device) for t in self.tensors)


@torch.no_grad()
def apply_plan_sequential_(
    model: nn.Module,
    plan: PruningPlan,
    calibration_ids: torch.Tensor | None,
    compensation: Compensation | str = "lstsq",
    damp: float = DEFAULT_DAMP,
    batch_size: int = 8,
    progress: bool = False,
    target: Target | str = DEFAULT_TARGET,
    target_norm: TargetNorm | str = DEFAULT_TARGET_NORM,
) -> GQAGeometry:
    """Slice ``model`` to ``plan`` layer by layer, compensating each cut on calibration data.

    Keeps exactly the plan's units; :func:`prune_sequential_` can also choose them
    (``selection="repair"``) and returns the plan it applied.

    Args:
        model: a causal LM of a supported family (weights in any float dtype).
        plan: the kept groups and channels of every layer.
        calibration_ids: ``(num_samples, seq_len)`` calibration tokens, no padding; unused
            (may be None) for ``none``.
        compensation: ``none`` = plain deletion (exactly :func:`apply_plan_`); ``lstsq`` =
            ridge refit of the kept input columns of ``o_proj`` / ``down_proj``; ``bias`` =
            FLAP's mean contribution of the removed inputs as an ``o_proj`` / ``down_proj``
            bias (adds ``2 x hidden`` parameters per layer, and the checkpoint flag
            ``layer_output_bias``).
        damp: ridge strength of ``lstsq`` relative to the mean diagonal of the kept Gram block.
        batch_size: calibration sequences per layer forward.
        progress: show a progress bar over layers.
        target: ``local`` (refit to the layer's own output on the pruned inputs),
            ``dense`` (to the dense model's output; ``lstsq`` only) or a blend ``"0.25"``.
        target_norm: ``dense`` (the dense outputs as they are) or ``local`` (each token's
            dense output rescaled to the norm of the layer's own; :mod:`.solve`).

    Returns:
        The geometry of the pruned model.
    """
    args = (compensation, damp, batch_size, progress, "score", target, target_norm)
    return prune_sequential_(model, plan, calibration_ids, *args)[1]


@torch.no_grad()
def prune_sequential_(
    model: nn.Module,
    plan: PruningPlan,
    calibration_ids: torch.Tensor | None,
    compensation: Compensation | str = "lstsq",
    damp: float = DEFAULT_DAMP,
    batch_size: int = 8,
    progress: bool = False,
    selection: Selection | str = "score",
    target: Target | str = DEFAULT_TARGET,
    target_norm: TargetNorm | str = DEFAULT_TARGET_NORM,
) -> tuple[PruningPlan, GQAGeometry]:
    """:func:`apply_plan_sequential_`, optionally choosing which units go (same counts).

    Args:
        selection: ``score`` = keep the plan's units; ``repair`` = keep, in every layer, as
            many GQA groups and MLP channels as the plan but choose them by the error the
            ridge refit leaves (:mod:`gqa_prune.compensation.selection`; needs ``lstsq``).
        others: as :func:`apply_plan_sequential_`.

    Returns:
        ``(plan, geometry)``: the plan that was really applied, and the pruned geometry.
    """
    was_training = model.training
    model.eval()  # no dropout in the calibration passes
    try:
        args = (compensation, damp, batch_size, progress, selection, target, target_norm)
        return prune_layerwise_(ResidentLayers(model), plan, calibration_ids, *args)
    finally:
        model.train(was_training)


@torch.no_grad()
def prune_layerwise_(
    walk: LayerWalk,
    plan: PruningPlan,
    calibration_ids: torch.Tensor | None,
    compensation: Compensation | str = "lstsq",
    damp: float = DEFAULT_DAMP,
    batch_size: int = 8,
    progress: bool = False,
    selection: Selection | str = "score",
    target: Target | str = DEFAULT_TARGET,
    target_norm: TargetNorm | str = DEFAULT_TARGET_NORM,
) -> tuple[PruningPlan, GQAGeometry]:
    """The engine: :func:`prune_sequential_` over any :class:`LayerWalk` (see the module doc).

    Returns:
        ``(plan, geometry)``: the plan that was really applied, and the pruned geometry.
    """
    check_compensation(compensation, damp, target, target_norm)
    check_selection(selection, compensation)
    blend = target_blend(target)
    rescale = blend > 0 and target_norm == "local"
    adapter, model = walk.adapter, walk.model
    n = walk.num_layers
    by_layer = {lp.layer_idx: lp for lp in plan.layers}
    if len(plan.layers) != n or sorted(by_layer) != list(range(n)):
        raise GQAPruneError(f"pruning plan covers layers {sorted(by_layer)} but the model has {n}")
    states: list[torch.Tensor] = []
    calls: list[LayerCalls] = []
    if compensation != "none":
        calibration_ids = check_calibration_ids(compensation, calibration_ids, batch_size)
        states, calls = walk.capture(list(calibration_ids.split(batch_size)))
    if compensation == "bias":
        setattr(model.config, OUTPUT_BIAS_FLAG, True)
    dense_states: list[torch.Tensor] | None = None  # == states until a layer is cut
    applied = []
    desc = f"compensation {compensation}" + ("" if blend == 0 else f", target {target}")
    desc += ", local norm" if rescale else ""
    for i in tqdm(range(n), desc=desc, disable=not progress):
        lp = by_layer[i]
        with walk.layer(i, changed=True) as layer:
            if compensation == "none":
                slice_layer_(layer, lp, plan, adapter)
                applied.append(lp)
                continue
            if compensation == "bias":
                add_layer_output_biases_(layer, adapter)
            layer_calls = [c.of(i) for c in calls]
            cut = attention_cut(layer, lp, plan, adapter) or len(lp.keep_mlp_channels) != (
                adapter.mlp_projections(layer)[2].in_features
            )
            targets = None
            if blend > 0 and (cut or dense_states is not None):
                if dense_states is None:
                    dense_states = list(states)
                targets = _dense_pass(walk, layer, dense_states, layer_calls)
            view = _OnDevice(states, walk.device)
            lp, known = prune_layer_(
                layer,
                lp,
                plan,
                view,
                layer_calls,
                adapter,
                compensation,
                damp,
                selection,
                targets,
                walk.host,
                blend,
                rescale,
            )
            applied.append(lp)
            del targets
            if i + 1 < n:  # pass 3: norms and residual adds around the known block outputs
                with replaying(layer, adapter, known):
                    for b, call in enumerate(layer_calls):
                        states[b] = walk.run(layer, states[b], call).to(walk.host)
            del known
    del states, calls, dense_states
    plan = replace(plan, layers=tuple(applied))
    geometry = adapter.geometry(model)
    update_config_(model.config, geometry)
    check_pruned_model(model, plan)
    return plan, geometry


def _dense_pass(
    walk: LayerWalk, layer: nn.Module, dense_states: list[torch.Tensor], calls: Sequence[LayerCall]
) -> tuple[_OnDevice, _OnDevice]:
    """Pass 0: run the (still dense) layer on the dense stream, recording ``Y`` of
    ``o_proj`` and ``down_proj`` per batch; ``dense_states`` advance to its outputs.

    Returns:
        ``(y_o, y_down)``: per-batch targets on the host, seen on the device one at a time
        (``y_o`` empty when the layer has no attention block).
    """
    adapter = walk.adapter
    outputs: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])

    def recorder(sink: list[torch.Tensor]) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            bias = getattr(module, "bias", None)  # the refit fits X V^T to Y - b
            y = out.detach() if bias is None else out.detach() - bias
            sink.append(y.to(walk.host))

        return record

    linears = [adapter.mlp_projections(layer)[2]]
    if adapter.has_attention(layer):
        linears.insert(0, adapter.attention_projections(layer)[3])
    sinks = outputs if len(linears) == 2 else outputs[1:]
    pairs = zip(linears, sinks, strict=True)
    handles = [lin.register_forward_hook(recorder(s)) for lin, s in pairs]
    try:
        for b, call in enumerate(calls):
            dense_states[b] = walk.run(layer, dense_states[b], call).to(walk.host)
    finally:
        for handle in handles:
            handle.remove()
    return _OnDevice(outputs[0], walk.device), _OnDevice(outputs[1], walk.device)


def check_calibration_ids(
    compensation: str, calibration_ids: torch.Tensor | None, batch_size: int
) -> torch.Tensor:
    """The ids, checked: ``(num_samples, seq_len)``, non-empty, and batch_size >= 1.

    Raises:
        GQAPruneError: otherwise.
    """
    if calibration_ids is None or calibration_ids.ndim != 2 or calibration_ids.numel() == 0:
        shape = None if calibration_ids is None else tuple(calibration_ids.shape)
        raise GQAPruneError(
            f"compensation '{compensation}' needs calibration ids of shape (num_samples, "
            f"seq_len), got {shape}"
        )
    if batch_size < 1:
        raise GQAPruneError(f"batch_size must be >= 1, got {batch_size}")
    return calibration_ids


def _run_layer(layer: nn.Module, hidden: torch.Tensor, call: LayerCall) -> torch.Tensor:
    return hidden_of(layer(hidden, *call.args, **call.kwargs))


def _collect(
    layer: nn.Module,
    linear: nn.Linear,
    states: Sequence[torch.Tensor],
    calls: Sequence[LayerCall],
    gram: bool,
    targets: Sequence[torch.Tensor] | None = None,
    keep_on: torch.device | str | None = None,
    blend: float = 1.0,
    rescale: bool = False,
) -> InputStats:
    """Run ``layer`` over the calibration batches up to ``linear``, recording its inputs
    (and ``X^T Y`` against the per-batch dense ``targets``, when given, blended with the
    local target as ``blend`` says, each token's target rescaled to the norm of ``linear``'s
    own output when ``rescale``; the inputs themselves when ``keep_on`` names a device).

    Each forward stops at ``linear``'s input: nothing after it is computed (for ``o_proj``
    the whole MLP, for ``down_proj`` the projection itself).
    """
    stats = InputStats(linear, gram, targets, keep_on=keep_on, rescale=rescale)
    stop = linear.register_forward_pre_hook(_stop_forward)  # runs after the statistics
    try:
        for hidden, call in zip(states, calls, strict=True):
            try:
                _run_layer(layer, hidden, call)
            except StopForward:
                pass
    finally:
        stop.remove()
        stats.remove()
    if stats.cross is not None and stats.gram is not None and blend < 1:
        stats.cross = blend_cross(stats.cross, stats.gram, linear.weight, blend)
    return stats


def _stop_forward(module: nn.Module, args: tuple[Any, ...]) -> None:
    raise StopForward


def _correction(
    linear: nn.Linear, keep: torch.Tensor, stats: InputStats, compensation: str, damp: float
) -> torch.Tensor:
    """Before slicing: the refitted kept columns (``lstsq``) or the bias increment (``bias``)."""
    if compensation == "lstsq":
        if stats.gram is None:
            raise RuntimeError("lstsq compensation needs the Gram matrix of the inputs")
        return ridge_refit(linear.weight, stats.gram, keep, damp, stats.cross)
    return removed_mean_contribution(linear.weight, stats.mean, keep)


def _apply_correction_(linear: nn.Linear, fix: torch.Tensor, compensation: str) -> None:
    """Write the refitted columns (after slicing), or add the bias increment (any time)."""
    if compensation == "lstsq":
        linear.weight.data.copy_(fix)
    elif linear.bias is not None:  # added by add_output_biases_
        linear.bias.data += fix
    else:
        raise RuntimeError("bias compensation needs an output bias (add_output_biases_)")


@dataclass
class BlockOutputs:
    """Per-batch outputs of a layer's final (pruned, refitted) attention and MLP blocks,
    computed from recorded projection inputs; None = not known, the block computes."""

    attention: list[torch.Tensor] | None = None
    mlp: list[torch.Tensor] | None = None


@contextmanager
def replaying(
    layer: nn.Module, adapter: ArchitectureAdapter, known: BlockOutputs
) -> Iterator[None]:
    """Inside the block, the layer's blocks with known outputs hand them out (:class:`Replay`)
    instead of computing them; the layer itself still runs its norms and residual adds."""
    attention = None if known.attention is None else Replay(known.attention, pair=True)
    mlp = None if known.mlp is None else Replay(known.mlp, pair=False)
    with adapter.blocks_replaced(layer, attention, mlp):
        yield


def _replayed(
    linear: nn.Linear, inputs: list[torch.Tensor], keep: torch.Tensor
) -> list[torch.Tensor]:
    """``linear`` (already sliced to ``keep`` and refitted) on the kept columns of each
    recorded input, back on the inputs' device."""
    device = linear.weight.device
    keep = keep.to(device)
    return [linear(x.to(device).index_select(-1, keep)).to(x.device) for x in inputs]


def prune_layer_(
    layer: nn.Module,
    lp: LayerPlan,
    plan: PruningPlan,
    states: Sequence[torch.Tensor],
    calls: Sequence[LayerCall],
    adapter: ArchitectureAdapter,
    compensation: str,
    damp: float,
    selection: str = "score",
    targets: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]] | None = None,
    host: torch.device | str | None = None,
    blend: float = 1.0,
    rescale: bool = False,
) -> tuple[LayerPlan, BlockOutputs]:
    """Slice one layer to ``lp``: attention first, then the MLP on the new attention output.

    Removing every KV group of a layer leaves no column to refit: ``lstsq`` then just drops
    the block, ``bias`` keeps the mean of its output as the removed block's constant.
    With ``selection="repair"`` the kept groups / channels (same counts as ``lp``) are chosen
    on the Gram matrix just collected, before slicing, and the selection's own ridge refit
    (``lam`` over all inputs) is written (:mod:`.selection`). ``targets`` are the dense
    model's ``o_proj`` / ``down_proj`` outputs per batch (pass 0; dense targets), of which
    the refit reproduces the share ``blend`` (:func:`~.solve.blend_cross`), each token's
    target rescaled to the norm of the layer's own output when ``rescale``.

    The statistics passes keep the projections' inputs (on ``host``; None = the layer's
    device), so a cut block's final output is one sliced matmul away: pass 2 replays the
    pruned attention instead of recomputing q/k/v and the attention scores, and the returned
    outputs let the caller's pass 3 skip both blocks (:func:`replaying`).

    Returns:
        ``(plan, outputs)``: the layer plan that was applied (``lp`` itself unless
        ``repair`` chose others) and the per-batch outputs of its final blocks.
    """
    _, _, down = adapter.mlp_projections(layer)
    keep_on = host if host is not None else down.weight.device
    cut_attn = attention_cut(layer, lp, plan, adapter)
    cut_mlp = len(lp.keep_mlp_channels) != down.in_features
    gram = compensation == "lstsq"
    repair = selection == "repair"
    known = BlockOutputs()
    if cut_attn and compensation == "lstsq" and not lp.keep_kv_groups:
        # the whole block goes and no column is left to refit: nothing to measure
        prune_attention_by_gqa_groups(layer, (), adapter, allow_removal=True)
    elif cut_attn:
        o = adapter.attention_projections(layer)[3]
        y_o = None if targets is None else targets[0]
        o_stats = _collect(
            layer,
            o,
            states,
            calls,
            gram,
            y_o,
            keep_on=keep_on,
            blend=blend,
            rescale=rescale,
        )
        width = plan.queries_per_kv * plan.head_dim
        fix = None
        if repair and lp.keep_kv_groups and o_stats.gram is not None:
            groups, fix = select_kept_units(
                o.weight, o_stats.gram, len(lp.keep_kv_groups), damp, width, o_stats.cross
            )
            lp = replace(lp, keep_kv_groups=groups)
        keep = group_rows(lp.keep_kv_groups, width)
        if fix is None:
            fix = _correction(o, keep, o_stats, compensation, damp)
        if compensation == "bias":  # the bias is not sliced; a removed block keeps it
            _apply_correction_(o, fix, compensation)
        prune_attention_by_gqa_groups(layer, lp.keep_kv_groups, adapter, allow_removal=True)
        if compensation == "lstsq":  # the refit kept columns
            _apply_correction_(o, fix, compensation)
        if adapter.has_attention(layer):  # (a removed block computes nothing anyway)
            kept_columns = group_rows(sorted(lp.keep_kv_groups), width)
            known.attention = _replayed(o, o_stats.inputs, kept_columns)
        del o_stats
    if cut_mlp:
        y_down = None if targets is None else targets[1]
        replay, recorder = BlockOutputs(attention=known.attention), None
        if known.attention is None and adapter.has_attention(layer):  # computed once, here
            known.attention = []
            recorder = adapter.attention(layer).register_forward_hook(
                _output_recorder(known.attention, keep_on)
            )
        try:
            with replaying(layer, adapter, replay):
                down_stats = _collect(
                    layer,
                    down,
                    states,
                    calls,
                    gram,
                    y_down,
                    keep_on=keep_on,
                    blend=blend,
                    rescale=rescale,
                )
        finally:
            if recorder is not None:
                recorder.remove()
        fix = None
        if repair and down_stats.gram is not None:  # selection and refit in one (W')
            channels, fix = select_kept_units(
                down.weight, down_stats.gram, len(lp.keep_mlp_channels), damp, 1, down_stats.cross
            )
            lp = replace(lp, keep_mlp_channels=channels)
        kept_channels = torch.as_tensor(sorted(lp.keep_mlp_channels), dtype=torch.long)
        if fix is None:
            fix = _correction(down, kept_channels, down_stats, compensation, damp)
        prune_mlp_channels(layer, lp.keep_mlp_channels, adapter)
        _apply_correction_(down, fix, compensation)
        known.mlp = _replayed(down, down_stats.inputs, kept_channels)
        del down_stats
    return lp, known


def _output_recorder(sink: list[torch.Tensor], device: torch.device | str) -> Callable[..., None]:
    """A forward hook appending a block's output (a tensor or a tuple's first item)."""

    def record(module: nn.Module, args: tuple, out: Any) -> None:
        sink.append(hidden_of(out).detach().to(device))

    return record


def add_output_biases_(model: nn.Module, adapter: ArchitectureAdapter | None = None) -> None:
    """Give every ``o_proj`` and ``down_proj`` a bias (zeros where it had none), in place.

    Sets ``config.layer_output_bias = True``, so that a saved checkpoint rebuilds the biases
    (the shipped modeling code reads the flag).
    """
    adapter = adapter or get_adapter(model)
    for layer in adapter.decoder_layers(model):
        add_layer_output_biases_(layer, adapter)
    setattr(model.config, OUTPUT_BIAS_FLAG, True)


def add_layer_output_biases_(layer: nn.Module, adapter: ArchitectureAdapter) -> None:
    """:func:`add_output_biases_` for one decoder layer (does not set the config flag)."""
    down = adapter.mlp_projections(layer)[2]
    if adapter.has_attention(layer):
        outputs = [adapter.attention_projections(layer)[3], down]
    else:  # an attention block removed earlier: its constant output becomes the bias
        outputs = [down]
        removed = adapter.attention(layer)
        if removed.bias is None:
            removed.bias = nn.Parameter(torch.zeros_like(down.weight[:, 0]))
    for linear in outputs:
        if linear.bias is None:
            w = linear.weight
            linear.bias = nn.Parameter(
                torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                requires_grad=w.requires_grad,
            )
