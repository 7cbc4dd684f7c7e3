"""In-process search of the attention:MLP split of the removed parameters.

The original code re-ran the whole pruning script once per split and parsed perplexity
from stdout. Here everything that does not depend on the split is computed once on the
dense model, and only the cheap part is repeated per candidate ``a:m``::

    once:           layer importance  (calibration windows, seed + 1)
                    unit scores       (Taylor gradients etc., calibration windows, seed)
                    dense perplexity on the validation tokens
    per candidate:  allocate(distribution=(a, m)) -> build_plan -> copy of the dense model
                    -> slice it (with the compensation, windows seed + 2) -> perplexity
                    on the validation tokens [-> zero-shot accuracy on validation files]

Scores are a property of the dense model, so a candidate pruned here equals
``prune_model_`` on a fresh copy with the same calibration windows and ``a:m`` (the
windows are drawn with the same seeds as ``gqa-prune`` itself). The compensation depends
on the plan, so it is the part that is repeated.

Validation, never the test split: the text is the calibration (non-test) split; its last
``validation_fraction`` of tokens is held out for perplexity and the calibration windows
are drawn only from the tokens before it, so the two never overlap.

``rank_by="zeroshot"`` ranks by zero-shot accuracy instead (mean of acc_norm, or acc where a
task has none) on the **validation** files of the standard suite (ARC-Easy, ARC-Challenge,
OpenBookQA ``validation.jsonl``; see :mod:`gqa_prune.evaluation.tasks`), never on the items
that are reported. It costs one zero-shot evaluation per candidate (plus the dense one).
``rank_by="logprob"`` runs the same evaluation and ranks by the mean log-probability of the
right choice (``log softmax_i(ll_i)[gold]``, see :mod:`gqa_prune.evaluation.tasks`), which
moves with every item where accuracy near chance does not.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any, Literal

import torch
from torch import nn

from gqa_prune.allocation import Allocation, AllocationConfig, allocate, allocate_global
from gqa_prune.analysis import compute_layer_importance
from gqa_prune.compensation import (
    DEFAULT_DAMP,
    DEFAULT_TARGET,
    DEFAULT_TARGET_NORM,
    check_compensation,
    check_selection,
    prune_sequential_,
)
from gqa_prune.data import bos_prefix, compensation_windows, sample_calibration, tokenize_text
from gqa_prune.errors import GQAPruneError
from gqa_prune.evaluation.perplexity import evaluate_perplexity
from gqa_prune.evaluation.tasks import SUITE
from gqa_prune.evaluation.zeroshot import ZeroShotResult, evaluate_zeroshot, prepare_tasks
from gqa_prune.importance import UnitScores, compute_unit_scores
from gqa_prune.models.adapters import get_adapter
from gqa_prune.models.geometry import GQAGeometry
from gqa_prune.pipeline import build_plan
from gqa_prune.slicing import apply_plan_

log = logging.getLogger(__name__)

Distribution = tuple[float, float]
RankBy = Literal["ppl", "zeroshot", "logprob"]
RANK_BY: tuple[str, ...] = ("ppl", "zeroshot", "logprob")
# rankings that evaluate the zero-shot validation tasks
ZEROSHOT_RANKINGS: tuple[str, ...] = ("zeroshot", "logprob")


def parse_distributions(text: str) -> tuple[Distribution, ...]:
    """``"0:10,1:9,2:8"`` -> ``((0.0, 10.0), (1.0, 9.0), (2.0, 8.0))``.

    Raises:
        GQAPruneError: an item is not ``a:m`` with non-negative numbers, not both zero, or
            two items give the same attention share ``a / (a + m)``.
    """
    items = [t.strip() for t in str(text).split(",")]
    if not any(items):
        raise GQAPruneError(
            "--distributions is empty; pass attention:MLP splits, e.g. 0:10,1:9,2:8"
        )
    out: list[Distribution] = []
    for item in items:
        parts = item.split(":")
        try:
            a, m = (float(p) for p in parts)
        except ValueError:
            raise GQAPruneError(
                f"--distributions item '{item}' is not of the form a:m (e.g. 1:9); pass "
                "comma-separated splits such as 0:10,1:9,2:8"
            ) from None
        if not (math.isfinite(a) and math.isfinite(m)) or a < 0 or m < 0 or a + m == 0:
            raise GQAPruneError(
                f"--distributions item '{item}' needs finite non-negative parts, not both zero"
            )
        out.append((a, m))
    shares = [a / (a + m) for a, m in out]
    for i, s in enumerate(shares):
        if any(math.isclose(s, t, abs_tol=1e-12) for t in shares[:i]):
            raise GQAPruneError(
                f"--distributions item '{items[i]}' repeats the attention share of an "
                "earlier item; list each split once"
            )
    return tuple(out)


def split_validation(
    tokens: torch.Tensor, validation_fraction: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a 1-D token stream into ``(calibration_part, validation_part)``: head and tail.

    Raises:
        GQAPruneError: the fraction is not in (0, 1) or either part would be shorter than
            two tokens.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise GQAPruneError(
            f"--validation_fraction must be between 0 and 1 (exclusive), got {validation_fraction}"
        )
    cut = tokens.numel() - int(round(validation_fraction * tokens.numel()))
    if cut < 2 or tokens.numel() - cut < 2:
        raise GQAPruneError(
            f"the calibration text has {tokens.numel()} tokens: too few to hold out "
            f"{validation_fraction:.0%} for validation; use a longer text"
        )
    return tokens[:cut], tokens[cut:]


@dataclass(frozen=True)
class SearchConfig:
    """Settings of a split search (the rest of the allocation comes from ``allocation``).

    Attributes:
        distributions: candidate ``(a, m)`` splits of the removed parameters.
        allocation: target ratio, strategy and constraints; its ``distribution`` is
            replaced by each candidate.
        mode: ``layer`` (``allocate``) or ``global`` (``allocate_global``).
        layer_importance_method: ``removal``, ``activation`` or ``block_influence``.
        layer_importance_samples: calibration windows for the layer importance.
        criterion: unit importance criterion (``taylor``, ``magnitude``, ...).
        aggregation: how a unit's element scores combine.
        calibration_samples: calibration windows for the unit scores.
        seq_len: tokens per calibration window.
        batch_size: windows per forward/backward of the scoring.
        validation_fraction: share of the text's tokens (its end) held out for validation.
        eval_seq_len: perplexity window length.
        eval_max_windows: evaluate only the first N validation windows (None = all).
        eval_batch_size: windows per perplexity forward.
        compensation: ``none``, ``lstsq`` or ``bias`` (see ``gqa_prune.compensation``).
        compensation_samples: calibration windows of the compensation.
        compensation_seq_len: tokens per compensation window.
        compensation_damp: ridge strength of ``lstsq``.
        selection: ``score`` or ``repair`` (which units go; see ``gqa_prune.compensation``).
        compensation_target: ``local``, ``dense`` or a blend ``"0.25"`` (what the ``lstsq``
            refit reproduces).
        compensation_target_norm: ``dense`` or ``local`` (the size of each token's dense
            target; see ``gqa_prune.compensation``).
        seed: seed of the calibration sampling (and of the ``random`` criterion).
        rank_by: ``ppl`` (validation perplexity, lower is better), ``zeroshot``
            (validation zero-shot accuracy, higher is better; ties -> lower perplexity) or
            ``logprob`` (the same tasks' mean right-choice log-probability, higher is better).
        zeroshot_tasks: tasks of the zero-shot ranking (``zeroshot6`` = those of the suite
            with validation files), always on their validation split.
        zeroshot_limit: the first N validation items per task (None = all).
        zeroshot_data_dir: folder of ``<task>/validation.jsonl`` (None = the data
            directory's ``zeroshot/``, from ``$GQA_PRUNE_DATA_DIR``).
    """

    distributions: tuple[Distribution, ...]
    allocation: AllocationConfig
    mode: Literal["layer", "global"] = "layer"
    layer_importance_method: str = "removal"
    layer_importance_samples: int = 8
    criterion: str = "taylor"
    aggregation: str = "sum"
    calibration_samples: int = 32
    seq_len: int = 128
    batch_size: int = 4
    validation_fraction: float = 0.1
    eval_seq_len: int = 128
    eval_max_windows: int | None = None
    eval_batch_size: int = 8
    compensation: str = "lstsq"
    compensation_samples: int = 64
    compensation_seq_len: int = 128
    compensation_damp: float = DEFAULT_DAMP
    selection: str = "score"
    compensation_target: str = DEFAULT_TARGET
    compensation_target_norm: str = DEFAULT_TARGET_NORM
    seed: int = 42
    rank_by: RankBy = "ppl"
    zeroshot_tasks: str = SUITE
    zeroshot_limit: int | None = None
    zeroshot_data_dir: str | None = None

    def __post_init__(self) -> None:
        if not self.distributions:
            raise GQAPruneError("--distributions is empty; pass e.g. 0:10,1:9,2:8")
        if not 0.0 < self.validation_fraction < 1.0:
            raise GQAPruneError(
                "--validation_fraction must be between 0 and 1 (exclusive), got "
                f"{self.validation_fraction}"
            )
        check_compensation(
            self.compensation,
            self.compensation_damp,
            self.compensation_target,
            self.compensation_target_norm,
        )
        check_selection(self.selection, self.compensation)
        if self.rank_by not in RANK_BY:
            raise GQAPruneError(
                f"unknown --rank_by '{self.rank_by}'; choose one of {', '.join(RANK_BY)}"
            )
        if self.zeroshot_limit is not None and self.zeroshot_limit <= 0:
            raise GQAPruneError(f"--zeroshot_limit must be positive, got {self.zeroshot_limit}")
        if self.mode not in ("layer", "global"):
            raise GQAPruneError(f"unknown --pruning_mode '{self.mode}'; choose layer or global")
        if not self.allocation.prune_mlp or not self.allocation.prune_attention:
            raise GQAPruneError(
                "a split search needs both attention and MLP pruning (prune_attention and "
                "prune_mlp True)"
            )


@dataclass(frozen=True)
class Candidate:
    """One split and what it gave; ``error`` is set (and ``ppl`` None) when infeasible.

    ``zeroshot`` (mean validation score), ``zeroshot_logprob`` (mean right-choice
    log-probability) and ``zeroshot_tasks`` (per task) are set with ``rank_by="zeroshot"``
    or ``"logprob"``.
    """

    distribution: Distribution
    attention_share: float
    ppl: float | None
    achieved_ratio: float | None
    attention_ratio: float | None
    mlp_ratio: float | None
    params_after: int | None
    error: str | None = None
    zeroshot: float | None = None
    zeroshot_tasks: dict[str, float | None] = field(default_factory=dict)
    zeroshot_logprob: float | None = None

    @property
    def label(self) -> str:
        a, m = self.distribution
        return f"{a:g}:{m:g}"


@dataclass(frozen=True)
class SearchResult:
    """Every candidate, the best one and the shared inputs.

    Attributes:
        candidates: in the order given.
        best: index into ``candidates``: lowest validation perplexity, or with
            ``rank_by="zeroshot"`` highest validation zero-shot score, with ``"logprob"``
            highest right-choice log-probability.
        dense_ppl: perplexity of the unpruned model on the same validation tokens.
        pruning_ratio: the target fraction of all parameters removed.
        validation: where the validation tokens come from (dataset, token range, windows).
        layer_importance: per-layer scores used by every candidate.
        layer_importance_method: how they were measured.
        rank_by: ``ppl``, ``zeroshot`` or ``logprob``.
        dense_zeroshot: the unpruned model's validation zero-shot score (zero-shot rankings).
        dense_zeroshot_logprob: its mean right-choice log-probability (zero-shot rankings).
        zeroshot_validation: the zero-shot ranking's split, tasks, files and limit.
    """

    candidates: tuple[Candidate, ...]
    best: int
    dense_ppl: float
    pruning_ratio: float
    validation: dict[str, Any]
    layer_importance: tuple[float, ...]
    layer_importance_method: str
    rank_by: str = "ppl"
    dense_zeroshot: float | None = None
    zeroshot_validation: dict[str, Any] | None = None
    dense_zeroshot_logprob: float | None = None

    @property
    def best_candidate(self) -> Candidate:
        return self.candidates[self.best]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["best_distribution"] = self.best_candidate.label
        return d


def _allocation(
    config: SearchConfig,
    distribution: Distribution,
    importance: Sequence[float],
    scores: UnitScores,
    geometry: GQAGeometry,
) -> Allocation:
    alloc_config = replace(config.allocation, distribution=distribution)
    if config.mode == "global":
        return allocate_global(
            scores.groups,  # type: ignore[arg-type]  # 1-D tensors act as sequences
            scores.channels,  # type: ignore[arg-type]
            geometry,
            alloc_config,
            importance=importance,
        )
    return allocate(importance, geometry, alloc_config)


def _refuse_if_none_feasible(config: SearchConfig, geometry: GQAGeometry) -> None:
    """Before the costly part: stop if no split is feasible even with equal importance.

    (With the real importance a split may still turn out infeasible; it is then reported
    in the result, not fatal.)
    """
    if config.mode != "layer":
        return
    errors = []
    for dist in config.distributions:
        try:
            allocate(
                [1.0] * geometry.num_layers, geometry, replace(config.allocation, distribution=dist)
            )
        except GQAPruneError as exc:
            errors.append(str(exc))
    if len(errors) == len(config.distributions):
        raise GQAPruneError(f"no --distributions candidate is feasible: {errors[0]}")


@dataclass
class _Shared:
    """What every candidate reuses: computed once on the dense model."""

    importance: tuple[float, ...]
    importance_method: str
    scores: UnitScores
    compensation_ids: torch.Tensor | None


def _shared_inputs(
    model: nn.Module,
    calib: torch.Tensor,
    config: SearchConfig,
    progress: bool,
    bos: int | None = None,
) -> _Shared:
    """Layer importance, unit scores and compensation windows, with ``gqa-prune``'s seeds."""
    c = config
    ids = sample_calibration(calib, c.layer_importance_samples, c.seq_len, c.seed + 1, bos)
    importance = compute_layer_importance(
        model,
        ids,
        c.layer_importance_method,  # type: ignore[arg-type]  # checked by the analysis
        batch_size=c.batch_size,
        progress=progress,
    )
    calibration = sample_calibration(calib, c.calibration_samples, c.seq_len, c.seed, bos)
    scores = compute_unit_scores(
        model, calibration, c.criterion, c.aggregation, c.batch_size, c.seed, progress
    )
    comp = None
    if c.compensation != "none":
        comp = compensation_windows(
            calib, c.compensation_samples, c.compensation_seq_len, c.seed, bos
        )
    return _Shared(tuple(importance.scores), importance.method, scores, comp)


def _candidate(
    model: nn.Module,
    dist: Distribution,
    shared: _Shared,
    config: SearchConfig,
    perplexity: Callable[[nn.Module], float],
    progress: bool,
    zeroshot: Callable[[nn.Module], ZeroShotResult] | None = None,
) -> Candidate:
    """Prune a copy of the dense ``model`` with split ``dist`` and evaluate it."""
    a, m = dist
    geometry = get_adapter(model).geometry(model)
    try:
        allocation = _allocation(config, dist, shared.importance, shared.scores, geometry)
    except GQAPruneError as exc:
        log.warning("search: split %g:%g is infeasible: %s", a, m, exc)
        return Candidate(dist, a / (a + m), None, None, None, None, None, str(exc))
    pruned = copy.deepcopy(model)
    plan = build_plan(shared.scores, allocation, geometry)
    if shared.compensation_ids is None:
        after = apply_plan_(pruned, plan)
    else:
        plan, after = prune_sequential_(
            pruned, plan, shared.compensation_ids, config.compensation,
            config.compensation_damp, config.batch_size, progress, config.selection,
            config.compensation_target, config.compensation_target_norm,
        )  # fmt: skip
    ppl = perplexity(pruned)
    log.info("search: split %g:%g -> validation perplexity %.3f", a, m, ppl)
    zs = zeroshot(pruned) if zeroshot is not None else None
    if zs is not None:
        log.info("search: split %g:%g -> validation zero-shot %.4f", a, m, zs.mean_score or 0)
    return Candidate(
        distribution=dist,
        attention_share=a / (a + m),
        ppl=ppl,
        achieved_ratio=allocation.achieved_ratio,
        attention_ratio=1 - sum(after.kv_heads) / sum(geometry.kv_heads),
        mlp_ratio=1 - sum(after.intermediate_sizes) / sum(geometry.intermediate_sizes),
        params_after=after.total_params,
        zeroshot=None if zs is None else zs.mean_score,
        zeroshot_tasks={} if zs is None else {n: zs.tasks[n].score for n in zs.requested},
        zeroshot_logprob=None if zs is None else zs.mean_logprob,
    )


def search_distributions(
    model: nn.Module,
    tokenizer: Any,
    text: str,
    config: SearchConfig,
    *,
    dataset: str = "",
    progress: bool = True,
) -> SearchResult:
    """Prune a copy of ``model`` per candidate split; rank them on validation data.

    ``model`` itself is not changed (its gradients are used for Taylor scores, then freed).

    Args:
        model: the dense causal LM.
        tokenizer: its tokenizer.
        text: calibration (non-test) text; its tail is the validation set.
        config: candidates and settings.
        dataset: name recorded with the result.
        progress: show progress bars.

    Returns:
        The candidates with their perplexities (and validation zero-shot scores); ``best``
        = lowest perplexity, or highest zero-shot score with ``rank_by="zeroshot"``, or
        highest right-choice log-probability with ``"logprob"``.

    Raises:
        GQAPruneError: bad settings, too little text, no candidate is feasible, or (rank
            by zero-shot) a validation file is missing or lm-eval is not installed.
    """
    calib, val = split_validation(tokenize_text(tokenizer, text), config.validation_fraction)
    bos = bos_prefix(tokenizer)  # windows start with BOS where the tokenizer adds one
    _refuse_if_none_feasible(config, get_adapter(model).geometry(model))
    zeroshot: Callable[[nn.Module], ZeroShotResult] | None = None
    if config.rank_by in ZEROSHOT_RANKINGS:  # files and names checked before the costly part
        selection = prepare_tasks(
            config.zeroshot_tasks, split="validation", zeroshot_data_dir=config.zeroshot_data_dir
        )
        zeroshot = partial(
            evaluate_zeroshot, tokenizer=tokenizer, tasks=selection,
            batch_size=config.eval_batch_size, limit=config.zeroshot_limit, seed=config.seed,
        )  # fmt: skip

    def perplexity(m: nn.Module) -> float:
        return evaluate_perplexity(
            m, val, config.eval_seq_len, config.eval_max_windows, config.eval_batch_size,
            dataset=dataset, progress=progress, bos_token_id=bos,
        ).ppl  # fmt: skip

    shared = _shared_inputs(model, calib, config, progress, bos)
    dense_ppl = perplexity(model)
    log.info("search: dense validation perplexity %.3f", dense_ppl)
    dense_zs = zeroshot(model) if zeroshot is not None else None
    candidates = tuple(
        _candidate(model, dist, shared, config, perplexity, progress, zeroshot)
        for dist in config.distributions
    )
    ppls = {i: c.ppl for i, c in enumerate(candidates) if c.ppl is not None}
    if not ppls:
        raise GQAPruneError(f"no --distributions candidate is feasible: {candidates[0].error}")
    finite = {i: p for i, p in ppls.items() if math.isfinite(p)} or ppls
    best = min(finite, key=finite.__getitem__)
    if config.rank_by == "zeroshot":  # highest score; equal scores -> lower perplexity
        best = max(finite, key=lambda i: (candidates[i].zeroshot or 0.0, -finite[i]))
    elif config.rank_by == "logprob":  # highest; a task set without one ranks by perplexity
        best = max(
            finite, key=lambda i: (_or_minus_inf(candidates[i].zeroshot_logprob), -finite[i])
        )
    return SearchResult(
        candidates=candidates,
        best=best,
        dense_ppl=dense_ppl,
        pruning_ratio=config.allocation.pruning_ratio,
        validation={
            "dataset": dataset,
            "split": "calibration (non-test) split, held-out tail",
            "first_token": int(calib.numel()),
            "num_tokens": int(val.numel()),
            "seq_len": config.eval_seq_len,
            "max_windows": config.eval_max_windows,
        },
        layer_importance=shared.importance,
        layer_importance_method=shared.importance_method,
        rank_by=config.rank_by,
        dense_zeroshot=None if dense_zs is None else dense_zs.mean_score,
        dense_zeroshot_logprob=None if dense_zs is None else dense_zs.mean_logprob,
        zeroshot_validation=None
        if dense_zs is None
        else {
            "split": "validation",
            "tasks": list(dense_zs.requested),
            "files": dict(dense_zs.sources),
            "limit": config.zeroshot_limit,
            "score": "mean of acc_norm (acc where a task has none)",
        },
    )


def _or_minus_inf(value: float | None) -> float:
    return -math.inf if value is None else value


__all__ = [
    "RANK_BY",
    "Candidate",
    "SearchConfig",
    "SearchResult",
    "parse_distributions",
    "search_distributions",
    "split_validation",
]
