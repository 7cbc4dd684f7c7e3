"""Name -> unit-scoring criterion: an explicit dict filled by ``@register_criterion``.

Each scorer module (``taylor.py``, ``magnitude.py``, ``wanda.py``, ``random.py``) registers
its functions at import time; :mod:`gqa_prune.importance.compute` imports all of them, so
the registry is complete whenever :func:`~gqa_prune.importance.compute_unit_scores` is
reachable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, get_args

import torch
from torch import nn

from gqa_prune.errors import GQAPruneError
from gqa_prune.importance.base import Aggregation, UnitScores

Criterion = Literal["taylor", "taylor2", "magnitude", "wanda", "random"]
CRITERIA: tuple[str, ...] = get_args(Criterion)


class Scorer(Protocol):
    """The signature every registered criterion implements.

    Options a criterion has no use for are accepted and ignored (``seed`` outside
    ``random``, ``batch_size`` for ``magnitude``/``random``, ...).
    """

    def __call__(
        self,
        model: nn.Module,
        input_ids: torch.Tensor | None,
        *,
        aggregation: Aggregation,
        batch_size: int,
        seed: int,
        progress: bool,
    ) -> UnitScores: ...


@dataclass(frozen=True)
class CriterionSpec:
    """One registered criterion.

    Attributes:
        name: the name users pass (``--importance``).
        fn: the scorer.
        needs_data: it runs the model on calibration tokens (``input_ids`` required).
    """

    name: str
    fn: Scorer
    needs_data: bool


SCORERS: dict[str, CriterionSpec] = {}


def register_criterion(name: str, *, needs_data: bool) -> Callable[[Scorer], Scorer]:
    """Decorator: register ``fn`` under ``name`` (which must be listed in ``Criterion``)."""
    if name not in CRITERIA:
        raise ValueError(
            f"criterion '{name}' is not declared in Criterion {CRITERIA}; add it there"
        )

    def decorate(fn: Scorer) -> Scorer:
        if name in SCORERS:
            raise ValueError(f"criterion '{name}' is registered twice")
        SCORERS[name] = CriterionSpec(name=name, fn=fn, needs_data=needs_data)
        return fn

    return decorate


def get_criterion(name: str) -> CriterionSpec:
    """The criterion registered as ``name``; unknown names raise a list of the valid ones."""
    if name not in SCORERS:
        raise GQAPruneError(
            f"unknown importance criterion '{name}'; choose one of: {', '.join(CRITERIA)}"
        )
    return SCORERS[name]
