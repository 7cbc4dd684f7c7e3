"""Compensation: repair the weights that stay after pruning, layer by layer.

- ``lstsq`` (default): ridge refit of the kept input columns of ``o_proj`` and ``down_proj``
  so that they reproduce the dense projection's output on calibration data (:mod:`.solve`).
- ``bias``: FLAP's mean contribution of the removed inputs as an output bias (checkpoints
  carry ``layer_output_bias: true``, read by the shipped modeling code).
- ``none``: plain deletion.

Layers are processed in order on the outputs of the already pruned layers below
(:mod:`.sequential`, with its per-layer time and memory cost).

Selection (``prune_sequential_(..., selection=...)``): ``score`` keeps the units the plan
names; ``repair`` keeps as many but chooses them by the error the ``lstsq`` refit leaves
(greedy structured OBS on the same Gram matrices, :mod:`.selection`).

Target (``target=...``): ``local`` refits each projection to its own dense weights on the
pruned inputs; ``dense`` refits to the dense model's outputs, carried beside the pruned
stream, so each layer also corrects the error arriving from below; a number in [0, 1]
blends the two (the dense outputs' share). Target norm (``target_norm=...``): ``dense`` uses
the dense outputs as they are; ``local`` (default) rescales each token's to the size of the
layer's own output (the dense direction, the pruned size).

Measured on SmolLM2-135M, 25% of all parameters removed (inverse, alpha 2, split 1:9),
64 x 128 compensation tokens, WikiText-2 perplexity (seq_len 128, 40 windows): dense 59.10,
plain deletion 164.18, ``bias`` 148.79, ``lstsq`` 124.40 at damp 0.1 (126.88 at 0.03,
125.20 at 0.3); see ``bench/bench_compensation.py``. Hence the defaults ``lstsq``, damp 0.1.
"""

from gqa_prune.compensation.selection import (
    SELECTIONS,
    Selection,
    check_selection,
    greedy_removal,
    removal_error,
    select_kept_units,
)
from gqa_prune.compensation.sensitivity import (
    SENSITIVITY_WEIGHTS,
    SensitivityWeights,
    check_sensitivity_weights,
    output_gradient_weights,
    repair_sensitivity,
)
from gqa_prune.compensation.sequential import (
    COMPENSATIONS,
    DEFAULT_DAMP,
    DEFAULT_TARGET,
    DEFAULT_TARGET_NORM,
    OUTPUT_BIAS_FLAG,
    TARGET_NORMS,
    TARGETS,
    Compensation,
    LayerWalk,
    ResidentLayers,
    Target,
    TargetNorm,
    add_output_biases_,
    apply_plan_sequential_,
    check_compensation,
    prune_layerwise_,
    prune_sequential_,
    target_blend,
)
from gqa_prune.compensation.solve import (
    blend_cross,
    removed_mean_contribution,
    rescale_rows,
    ridge_refit,
)

__all__ = [
    "COMPENSATIONS",
    "DEFAULT_DAMP",
    "DEFAULT_TARGET",
    "DEFAULT_TARGET_NORM",
    "TARGET_NORMS",
    "TargetNorm",
    "rescale_rows",
    "OUTPUT_BIAS_FLAG",
    "TARGETS",
    "Target",
    "LayerWalk",
    "ResidentLayers",
    "prune_layerwise_",
    "target_blend",
    "blend_cross",
    "Compensation",
    "add_output_biases_",
    "apply_plan_sequential_",
    "SELECTIONS",
    "Selection",
    "check_compensation",
    "check_selection",
    "greedy_removal",
    "prune_sequential_",
    "removal_error",
    "repair_sensitivity",
    "SENSITIVITY_WEIGHTS",
    "SensitivityWeights",
    "check_sensitivity_weights",
    "output_gradient_weights",
    "select_kept_units",
    "removed_mean_contribution",
    "ridge_refit",
]
