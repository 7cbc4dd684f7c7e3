"""Apply a PruningPlan layer by layer, compensating what each layer loses.

Layer ``l`` is calibrated on the outputs of layers ``0..l-1`` *as already pruned and
compensated*, so the refit of layer ``l`` also absorbs the error arriving from below::

    ids -> embed -> h0 -> [layer 0: stats, slice, refit] -> h1 -> [layer 1: ...] -> h2 ...
                    ^ recorded once       run the pruned layer ^ (replaces h0 in memory)

Per layer, at most three passes of that one layer over the calibration set:

1. the dense layer, with a pre-hook on ``o_proj`` (attention statistics);
   slice the GQA groups, refit ``o_proj``'s kept columns (or add FLAP's bias);
2. the layer with pruned attention, with a pre-hook on ``down_proj`` (skipped when the
   attention was not cut: pass 1 already saw the right MLP inputs);
   slice the MLP channels, refit ``down_proj``'s kept columns (or add the bias);
3. the pruned layer, whose outputs become the next layer's calibration inputs.

Memory: only the current boundary hidden states (``N x L x hidden``, model dtype) and one
Gram matrix are held, on the model's device, plus the recorded layer arguments (masks, rotary
tables) per batch. Cost per layer for Llama-3-8B (hidden 4096, 32 Q heads x 128, MLP 14336),
64 x 128 calibration tokens, bf16, 25% of the MLP channels removed (|S| = 10752 kept):

    what                                   size / work
    boundary hidden states (bf16)          64 x 128 x 4096 x 2 B         =  64 MiB
    o_proj Gram (fp32)                     4096^2 x 4 B                  =  64 MiB
    down_proj Gram (fp32)                  14336^2 x 4 B                 = 784 MiB (822 MB)
    ridge solve (fp64, in-place Cholesky)  |S|^2 x 8 B + |S| x 4096 x 8 B x 2
                                           measured peak 2.6 GiB above the Gram matrix
    Gram products (fp32)                   2 N I^2 = 3.4 TFLOP per layer (N = 8192 tokens)
    Cholesky + solve (fp64)                |S|^3/3 + 2 |S|^2 x 4096 = 1.4 TFLOP per layer
    layer forwards                         3 passes of the layer over the calibration set
    --selection repair (instead of the     H^-1 (fp64) 14336^2 x 8 B = 1.6 GiB + W' (fp64)
      down_proj solve; .selection)         0.47 GiB (+ 1.6 GiB transient); ~2 n^3 = 5.8 TFLOP

Measured on one CPU core (a 14336-wide random layer): Gram of 2048 tokens 16-25 s, the solve
50-100 s. On a GPU the Gram products take well under a second; the fp64 solve about a second
on data-centre GPUs and a few seconds on consumer GPUs (1/64-rate fp64). Everything is freed
after each layer. The attention refit is small (4096 features).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from gqa_prune.analysis.decoder_stack import (
    LayerCall,
    StopForward,
    hidden_of,
    input_device,
    split_layer_args,
)
from gqa_prune.compensation.selection import Selection, check_selection, select_kept_units
from gqa_prune.compensation.solve import removed_mean_contribution, ridge_refit
from gqa_prune.compensation.stats import InputStats
from gqa_prune.errors import GQAPruneError
from gqa_prune.models.adapters import ArchitectureAdapter, get_adapter
from gqa_prune.models.geometry import GQAGeometry
from gqa_prune.plan import LayerPlan, PruningPlan
from gqa_prune.slicing import (
    apply_plan_,
    attention_cut,
    check_pruned_model,
    group_rows,
    prune_attention_by_gqa_groups,
    prune_mlp_channels,
    update_config_,
)

log = logging.getLogger(__name__)

Compensation = Literal["none", "lstsq", "bias"]
COMPENSATIONS: tuple[str, ...] = ("none", "lstsq", "bias")
# lam = DEFAULT_DAMP * mean(diag(G_SS)); chosen on SmolLM2-135M (bench/bench_compensation.py)
DEFAULT_DAMP = 0.1
# Config flag read by the shipped modeling code: o_proj and down_proj of every layer carry a
# bias (FLAP's compensation), even where the family's config flags would build none.
OUTPUT_BIAS_FLAG = "layer_output_bias"


def check_compensation(compensation: str, damp: float) -> None:
    """Raise a GQAPruneError for an unknown compensation or a non-positive damp."""
    if compensation not in COMPENSATIONS:
        raise GQAPruneError(
            f"unknown compensation '{compensation}'; choose one of {', '.join(COMPENSATIONS)}"
        )
    if not damp > 0:
        raise GQAPruneError(f"compensation damp must be > 0 (e.g. {DEFAULT_DAMP}), got {damp}")


@torch.no_grad()
def apply_plan_sequential_(
    model: nn.Module,
    plan: PruningPlan,
    calibration_ids: torch.Tensor | None,
    compensation: Compensation | str = "lstsq",
    damp: float = DEFAULT_DAMP,
    batch_size: int = 8,
    progress: bool = False,
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

    Returns:
        The geometry of the pruned model.
    """
    return prune_sequential_(
        model, plan, calibration_ids, compensation, damp, batch_size, progress
    )[1]


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
    check_compensation(compensation, damp)
    check_selection(selection, compensation)
    if compensation == "none":
        return plan, apply_plan_(model, plan)
    calibration_ids = check_calibration_ids(compensation, calibration_ids, batch_size)
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    by_layer = {lp.layer_idx: lp for lp in plan.layers}
    if len(plan.layers) != len(layers) or sorted(by_layer) != list(range(len(layers))):
        raise GQAPruneError(
            f"pruning plan covers layers {sorted(by_layer)} but the model has {len(layers)}"
        )
    was_training = model.training
    model.eval()  # no dropout in the calibration passes
    if compensation == "bias":
        add_output_biases_(model, adapter)
    states, calls = record_layer_inputs(model, calibration_ids, batch_size)
    applied = []
    for i in tqdm(range(len(layers)), desc=f"compensation {compensation}", disable=not progress):
        layer = layers[i]
        applied.append(
            prune_layer_(
                layer, by_layer[i], plan, states, calls[i], adapter, compensation, damp, selection
            )
        )
        if i + 1 < len(layers):
            for b, (hidden, call) in enumerate(zip(states, calls[i], strict=True)):
                states[b] = _run_layer(layer, hidden, call)
    del states, calls
    model.train(was_training)
    plan = replace(plan, layers=tuple(applied))
    geometry = adapter.geometry(model)
    update_config_(model.config, geometry)
    check_pruned_model(model, plan)
    return plan, geometry


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


def record_layer_inputs(
    model: nn.Module, input_ids: torch.Tensor, batch_size: int
) -> tuple[list[torch.Tensor], list[list[LayerCall]]]:
    """Hidden states entering layer 0, and every layer's call arguments, per batch.

    Every layer's arguments are recorded (not only layer 0's), since a family may pass
    layers different masks (sliding-window layers). They are mostly shared tensors (one
    mask per layer type, one rotary table), so this holds little. Each forward stops at
    the last layer's pre-hook.

    Returns:
        ``(states, calls)``: ``states[b]`` of shape (B, L, hidden) on the model's device;
        ``calls[layer][b]`` the arguments of ``layer`` for batch ``b``.
    """
    layers = get_adapter(model).decoder_layers(model)
    device = input_device(model)
    states: list[torch.Tensor] = []
    calls: list[list[LayerCall]] = [[] for _ in layers]

    def recorder(index: int) -> Callable[[nn.Module, tuple, dict], None]:
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden, call = split_layer_args(args, kwargs)
            calls[index].append(call)
            if index == 0:
                states.append(hidden)
            if index == len(layers) - 1:
                raise StopForward

        return record

    handles = [
        layer.register_forward_pre_hook(recorder(i), with_kwargs=True)
        for i, layer in enumerate(layers)
    ]
    try:
        for batch in input_ids.split(batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    if any(len(c) != len(states) for c in calls):
        raise GQAPruneError(
            "the model's forward did not call every decoder layer once per batch; "
            "sequential compensation needs every layer to run"
        )
    return states, calls


def _run_layer(layer: nn.Module, hidden: torch.Tensor, call: LayerCall) -> torch.Tensor:
    return hidden_of(layer(hidden, *call.args, **call.kwargs))


def _collect(
    layer: nn.Module,
    linears: Sequence[nn.Linear],
    states: Sequence[torch.Tensor],
    calls: Sequence[LayerCall],
    gram: bool,
) -> list[InputStats]:
    """Run ``layer`` over the calibration batches, recording the inputs of ``linears``."""
    stats = [InputStats(linear, gram) for linear in linears]
    try:
        for hidden, call in zip(states, calls, strict=True):
            _run_layer(layer, hidden, call)
    finally:
        for s in stats:
            s.remove()
    return stats


def _correction(
    linear: nn.Linear, keep: torch.Tensor, stats: InputStats, compensation: str, damp: float
) -> torch.Tensor:
    """Before slicing: the refitted kept columns (``lstsq``) or the bias increment (``bias``)."""
    if compensation == "lstsq":
        if stats.gram is None:
            raise RuntimeError("lstsq compensation needs the Gram matrix of the inputs")
        return ridge_refit(linear.weight, stats.gram, keep, damp)
    return removed_mean_contribution(linear.weight, stats.mean, keep)


def _apply_correction_(linear: nn.Linear, fix: torch.Tensor, compensation: str) -> None:
    """Write the refitted columns (after slicing), or add the bias increment (any time)."""
    if compensation == "lstsq":
        linear.weight.data.copy_(fix)
    elif linear.bias is not None:  # added by add_output_biases_
        linear.bias.data += fix
    else:
        raise RuntimeError("bias compensation needs an output bias (add_output_biases_)")


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
) -> LayerPlan:
    """Slice one layer to ``lp``: attention first, then the MLP on the new attention output.

    Removing every KV group of a layer leaves no column to refit: ``lstsq`` then just drops
    the block, ``bias`` keeps the mean of its output as the removed block's constant.
    With ``selection="repair"`` the kept groups / channels (same counts as ``lp``) are chosen
    on the Gram matrix just collected, before slicing, and the selection's own ridge refit
    (``lam`` over all inputs) is written (:mod:`.selection`).

    Returns:
        The layer plan that was applied (``lp`` itself unless ``repair`` chose others).
    """
    _, _, down = adapter.mlp_projections(layer)
    cut_attn = attention_cut(layer, lp, plan, adapter)
    cut_mlp = len(lp.keep_mlp_channels) != down.in_features
    gram = compensation == "lstsq"
    repair = selection == "repair"
    if cut_attn:
        o = adapter.attention_projections(layer)[3]
        (o_stats,) = _collect(layer, [o], states, calls, gram)
        width = plan.queries_per_kv * plan.head_dim
        fix = None
        if repair and lp.keep_kv_groups and o_stats.gram is not None:
            groups, fix = select_kept_units(
                o.weight, o_stats.gram, len(lp.keep_kv_groups), damp, width
            )
            lp = replace(lp, keep_kv_groups=groups)
        keep = group_rows(lp.keep_kv_groups, width)
        no_columns_left = compensation == "lstsq" and not keep.numel()
        if fix is None and not no_columns_left:
            fix = _correction(o, keep, o_stats, compensation, damp)
        del o_stats
        if fix is not None and compensation == "bias":  # bias is not sliced; removal keeps it
            _apply_correction_(o, fix, compensation)
        prune_attention_by_gqa_groups(layer, lp.keep_kv_groups, adapter, allow_removal=True)
        if fix is not None and compensation == "lstsq":  # the refit kept columns
            _apply_correction_(o, fix, compensation)
    if cut_mlp:
        (down_stats,) = _collect(layer, [down], states, calls, gram)
        if repair and down_stats.gram is not None:  # selection and refit in one (W')
            channels, fix = select_kept_units(
                down.weight, down_stats.gram, len(lp.keep_mlp_channels), damp
            )
            lp = replace(lp, keep_mlp_channels=channels)
        else:
            keep = torch.as_tensor(sorted(lp.keep_mlp_channels), dtype=torch.long)
            fix = _correction(down, keep, down_stats, compensation, damp)
        del down_stats
        prune_mlp_channels(layer, lp.keep_mlp_channels, adapter)
        _apply_correction_(down, fix, compensation)
    return lp


def add_output_biases_(model: nn.Module, adapter: ArchitectureAdapter | None = None) -> None:
    """Give every ``o_proj`` and ``down_proj`` a bias (zeros where it had none), in place.

    Sets ``config.layer_output_bias = True``, so that a saved checkpoint rebuilds the biases
    (the shipped modeling code reads the flag).
    """
    adapter = adapter or get_adapter(model)
    for layer in adapter.decoder_layers(model):
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
    setattr(model.config, OUTPUT_BIAS_FLAG, True)
