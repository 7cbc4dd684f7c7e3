"""The recovery step of an experiment (``gqa-prune --finetune``), called by the runner.

Two calls: :func:`prepare_finetune` before anything is written (checks the settings against
the model and the text, and keeps the dense teacher for ``distill`` before pruning), and
:func:`finetune_step` after pruning (train, plot, save ``model_finetuned/``, evaluate).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gqa_prune.data import load_text, tokenize_text
from gqa_prune.errors import GQAPruneError
from gqa_prune.models.checkpoint import save_pruned
from gqa_prune.recovery.config import FinetuneConfig
from gqa_prune.recovery.plots import plot_finetune_loss
from gqa_prune.recovery.trainer import check_finetune_inputs, finetune_

if TYPE_CHECKING:
    from gqa_prune.config import RunConfig
    from gqa_prune.evaluation.perplexity import PerplexityResult
    from gqa_prune.reporting.experiment import ExperimentDir

log = logging.getLogger("gqa_prune.runner")

FINETUNED_DIR = "model_finetuned"
LOSS_PLOT = "finetune_loss.png"


@dataclass
class FinetunePrep:
    """What the recovery needs from before pruning."""

    config: FinetuneConfig
    tokens: torch.Tensor
    teacher: nn.Module | None


def prepare_finetune(
    config: RunConfig,
    exp: ExperimentDir,
    model: nn.Module,
    tokenizer: Any,
    calibration_tokens: torch.Tensor,
) -> FinetunePrep:
    """Check the recovery settings now; for ``distill`` copy the dense model (the teacher).

    The teacher is a full copy of the unpruned model on the same device: memory for one
    more dense model (and no optimizer state: it is frozen).
    """
    ft = config.finetune_config
    out = exp.path(FINETUNED_DIR)
    if out.exists() and not config.overwrite:
        raise GQAPruneError(
            f"experiment '{exp.root}' already holds {FINETUNED_DIR}/; pass --overwrite or choose "
            "another --save_ckpt_log_name"
        )
    if ft.dataset == config.calibration_dataset:
        tokens = calibration_tokens
    else:
        tokens = tokenize_text(tokenizer, load_text(str(ft.dataset), "calibration", ft.data_dir))
    teacher = None
    if ft.method == "distill":
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
    check_finetune_inputs(model, ft, tokens, teacher)
    return FinetunePrep(ft, tokens, teacher)


def finetune_step(
    config: RunConfig,
    exp: ExperimentDir,
    model: nn.Module,
    tokenizer: Any,
    prep: FinetunePrep,
    evaluate: Callable[[], PerplexityResult] | None,
    ppl: dict[str, PerplexityResult],
    timings: dict[str, float],
) -> dict[str, Any]:
    """Fine-tune the pruned model, write ``finetune_loss.png`` and ``model_finetuned/``.

    Adds ``ppl["after_finetune"]`` (when ``evaluate`` is given) and the timings; returns the
    summary's ``finetune`` section.
    """
    t0 = time.perf_counter()
    result = finetune_(model, tokenizer, prep.config, teacher=prep.teacher, tokens=prep.tokens)
    prep.teacher = None  # free the dense copy before evaluating / saving
    timings["finetune"] = time.perf_counter() - t0
    if result.stopped_early:
        log.warning("%s", result.message)
    log.info(
        "finetune (%s): %d steps, %d tokens, %.1f s, final loss %s",
        result.method,
        result.steps,
        result.tokens,
        result.wall_time_s,
        "n/a" if result.final_loss is None else f"{result.final_loss:.4f}",
    )
    plot_finetune_loss(
        exp.path(LOSS_PLOT), result, title=f"{config.base_model}: recovery ({result.method})"
    )
    t0 = time.perf_counter()
    save_pruned(model, tokenizer, exp.path(FINETUNED_DIR), overwrite=config.overwrite)
    timings["save_finetuned"] = time.perf_counter() - t0
    log.info("saved the fine-tuned model to %s", exp.path(FINETUNED_DIR))
    if evaluate is not None:
        t0 = time.perf_counter()
        ppl["after_finetune"] = evaluate()
        timings["eval_after_finetune"] = time.perf_counter() - t0
        log.info("perplexity after fine-tuning: %.3f", ppl["after_finetune"].ppl)
    return {**result.to_dict(), "settings": prep.config.to_dict()}
