"""Compensation: repair the weights that stay after pruning, layer by layer.

- ``lstsq``: ridge refit of the kept input columns of ``o_proj`` and ``down_proj`` so that
  they reproduce the dense projection's output on calibration data (:mod:`.solve`).
- ``bias``: FLAP's mean contribution of the removed inputs as an output bias.
- ``none``: plain deletion.

Layers are processed in order on the outputs of the already pruned layers below
(:mod:`.sequential`, with its per-layer time and memory cost).
"""

from gqa_prune.compensation.sequential import (
    COMPENSATIONS,
    DEFAULT_DAMP,
    OUTPUT_BIAS_FLAG,
    Compensation,
    add_output_biases_,
    apply_plan_sequential_,
    check_compensation,
    record_layer_inputs,
)
from gqa_prune.compensation.solve import removed_mean_contribution, ridge_refit

__all__ = [
    "COMPENSATIONS",
    "DEFAULT_DAMP",
    "OUTPUT_BIAS_FLAG",
    "Compensation",
    "add_output_biases_",
    "apply_plan_sequential_",
    "check_compensation",
    "record_layer_inputs",
    "removed_mean_contribution",
    "ridge_refit",
]
