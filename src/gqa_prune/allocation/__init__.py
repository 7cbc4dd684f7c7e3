"""Per-layer pruning budgets: layer importance (or unit scores) + a target -> what each layer keeps.

Pure arithmetic over a :class:`~gqa_prune.models.geometry.GQAGeometry`; no model, no torch.
The target is ``pruning_ratio`` of the parameters on ``pruning_ratio_basis`` (``total``, or
``non_embedding``: the transformer body), met within +-0.5 % of that basis.

Modules, each importing only those before it::

    config       AllocationConfig (validated settings), TOLERANCE
    result       Allocation, LayerAllocation (JSON round trip)
    target       the target in parameters on its basis; prunable layers; building the result
    solver       per-layer grids of reachable removals, reach check, exact search
    greedy       cheapest-first knapsack over units (global mode)
    layer        allocate():        --pruning_mode layer
    global_mode  allocate_global(): --pruning_mode global
"""

from gqa_prune.allocation.config import (
    BASES,
    STRATEGIES,
    TOLERANCE,
    AllocationConfig,
    Basis,
    Strategy,
)
from gqa_prune.allocation.global_mode import allocate_global
from gqa_prune.allocation.layer import allocate
from gqa_prune.allocation.result import Allocation, LayerAllocation

__all__ = [
    "BASES",
    "STRATEGIES",
    "TOLERANCE",
    "Allocation",
    "AllocationConfig",
    "Basis",
    "LayerAllocation",
    "Strategy",
    "allocate",
    "allocate_global",
]
