"""One entry point for every unit-importance criterion."""

from __future__ import annotations

import logging

import torch
from torch import nn

# The scorer modules are imported for their @register_criterion side effect (fills SCORERS).
import gqa_prune.importance.magnitude  # noqa: F401
import gqa_prune.importance.random  # noqa: F401
import gqa_prune.importance.taylor  # noqa: F401
import gqa_prune.importance.wanda  # noqa: F401
from gqa_prune.errors import GQAPruneError
from gqa_prune.importance.base import Aggregation, UnitScores, check_aggregation
from gqa_prune.importance.registry import CRITERIA, Criterion, get_criterion

log = logging.getLogger(__name__)

__all__ = ["CRITERIA", "Criterion", "compute_unit_scores"]


def compute_unit_scores(
    model: nn.Module,
    input_ids: torch.Tensor | None,
    criterion: Criterion | str = "taylor",
    aggregation: Aggregation | str = "sum",
    batch_size: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> UnitScores:
    """Score every GQA group and MLP channel of ``model``; higher = more important.

    Criteria (each documented in its module):

    - ``taylor``: ``|w * g|`` from calibration-loss gradients (first-order Taylor).
    - ``taylor2``: ``|w * g| + 1/2 * (w * g)**2``, adding the diagonal-Fisher
      second-order term.
    - ``magnitude``: L2 norm of the unit's weights; needs no data.
    - ``wanda``: ``|W_ij| * ||X_j||_2`` with input activation norms from calibration
      forwards (Sun et al. 2023).
    - ``random``: seeded ``Uniform[0, 1)`` baseline; needs no data.

    Args:
        model: a causal LM of a supported family, weights on one device or spread by
            ``device_map``; batches go to the device of its first parameter.
        input_ids: calibration tokens, shape ``(num_samples, seq_len)``, no padding.
            Required (non-empty) for ``taylor``, ``taylor2`` and ``wanda``; ignored
            otherwise (may be ``None``).
        criterion: one of :data:`CRITERIA`.
        aggregation: how a unit's element scores combine: ``sum`` (default), ``mean``
            or ``max``. For ``magnitude`` the score is ``sqrt(aggregate(w**2))``; for
            ``random`` it has no effect.
        batch_size: samples per forward (and backward) pass, >= 1.
        seed: seed for ``random``; unused by the other criteria.
        progress: show a progress bar over calibration batches.

    Returns:
        fp32 CPU scores: ``groups[l]`` of shape ``(num_kv_heads_l,)`` and
        ``channels[l]`` of shape ``(intermediate_size_l,)`` for every layer ``l``.

    Raises:
        GQAPruneError: unknown criterion or aggregation (the message lists the valid
            names), missing or empty ``input_ids`` for a data criterion, a bad
            ``batch_size``, or non-finite scores.
    """
    spec = get_criterion(criterion)
    check_aggregation(aggregation)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise GQAPruneError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if spec.needs_data:
        if input_ids is None or input_ids.numel() == 0:
            shape = None if input_ids is None else tuple(input_ids.shape)
            raise GQAPruneError(
                f"'{criterion}' importance needs calibration tokens, got input_ids={shape}; "
                "pass a (num_samples, seq_len) tensor, or use a data-free criterion "
                "('magnitude' or 'random')"
            )
        if input_ids.dim() != 2:
            raise GQAPruneError(
                f"input_ids must have shape (num_samples, seq_len), got {tuple(input_ids.shape)}"
            )
    log.info("unit importance: criterion=%s aggregation=%s", criterion, aggregation)
    scores = spec.fn(
        model,
        input_ids,
        aggregation=aggregation,  # type: ignore[arg-type]  # validated above
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    scores.check_finite(f"{criterion} importance")
    return scores
