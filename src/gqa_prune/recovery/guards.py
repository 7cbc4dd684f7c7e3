"""Trainer callbacks: loss history and the non-finite guard.

Both read the Trainer's per-step log (``logging_steps=1``): the loss there is gathered over
all processes, so under ``accelerate launch`` every rank sees the same value and takes the
same decision. ``logging_nan_inf_filter`` must be off, or the Trainer would replace a
non-finite loss by the running mean before any callback sees it.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from gqa_prune.errors import GQAPruneError

log = logging.getLogger(__name__)

LOGGED_KEYS = ("loss", "learning_rate", "grad_norm", "kl", "ce")


def _check_per_step_logging(args: Any) -> None:
    if args.logging_steps != 1 or args.logging_nan_inf_filter or args.logging_strategy != "steps":
        raise GQAPruneError(
            "the recovery callbacks need the Trainer to log every step with "
            "logging_strategy='steps', logging_steps=1, logging_nan_inf_filter=False; got "
            f"{args.logging_strategy}, {args.logging_steps}, {args.logging_nan_inf_filter}"
        )


class LossHistory(TrainerCallback):
    """Keep every step's loss (and learning rate, gradient norm, KD terms); log some of them.

    Args:
        every: write a log line every N steps (0 = about 20 lines per run).
    """

    def __init__(self, every: int = 0) -> None:
        self.every = every
        self.history: list[dict[str, float]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        _check_per_step_logging(args)
        if self.every == 0:
            self.every = max(1, state.max_steps // 20)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        entry = {"step": state.global_step, **{k: float(logs[k]) for k in LOGGED_KEYS if k in logs}}
        self.history.append(entry)
        if state.global_step % self.every == 0 or state.global_step in (1, state.max_steps):
            extra = "".join(f" {k} {entry[k]:.4f}" for k in ("kl", "ce") if k in entry)
            log.info(
                "finetune step %d/%d: loss %.4f%s lr %.2e",
                state.global_step,
                state.max_steps,
                entry["loss"],
                extra,
                entry.get("learning_rate", float("nan")),
            )


class NonFiniteGuard(TrainerCallback):
    """Stop at the first non-finite loss, gradient norm or weight; restore the last good weights.

    Every ``every`` steps (and before the first step) the trainable parameters are copied to
    CPU. After each optimizer step the logged loss and gradient norm and the trainable
    weights are checked; on a non-finite value the last copy is written back and training
    stops. ``stopped_at`` / ``restored_step`` / ``message`` say what happened.

    Args:
        model: the module the Trainer trains (the peft model for LoRA).
        every: snapshot interval in optimizer steps (1 = the previous step's weights).
    """

    def __init__(self, model: nn.Module, every: int = 1) -> None:
        self.model = model
        self.every = every
        self.params: dict[str, torch.nn.Parameter] = {}
        self.snapshot: dict[str, torch.Tensor] = {}
        self.snapshot_step: int | None = None
        self.stopped_at: int | None = None
        self.restored_step: int | None = None
        self.message = ""

    def on_train_begin(self, args, state, control, **kwargs):
        _check_per_step_logging(args)
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.take_snapshot(state.global_step)

    @torch.no_grad()
    def take_snapshot(self, step: int) -> None:
        self.snapshot = {n: p.detach().to("cpu", copy=True) for n, p in self.params.items()}
        self.snapshot_step = step

    @torch.no_grad()
    def restore(self) -> None:
        for n, p in self.params.items():
            p.copy_(self.snapshot[n].to(p.device))

    @torch.no_grad()
    def nonfinite_weights(self) -> list[str]:
        flags = torch.stack([torch.isfinite(p).all() for p in self.params.values()]).cpu()
        return [n for n, ok in zip(self.params, flags.tolist(), strict=True) if not ok]

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        step = state.global_step
        problems = [
            f"{k} {logs[k]}"
            for k in ("loss", "grad_norm")
            if k in logs and not math.isfinite(logs[k])
        ]
        bad_weights = self.nonfinite_weights()
        if bad_weights:
            problems.append(
                f"non-finite weights in {len(bad_weights)} tensors (e.g. {bad_weights[0]})"
            )
        if not problems:
            if step % self.every == 0:
                self.take_snapshot(step)
            return
        self.restore()
        self.stopped_at, self.restored_step = step, self.snapshot_step
        self.message = (
            f"fine-tuning stopped at step {step}: {'; '.join(problems)}; restored the weights "
            f"of step {self.snapshot_step} (last good copy). Lower --finetune_lr, keep "
            "--finetune_max_grad_norm > 0, or use --dtype float32"
        )
        log.error(self.message)
        control.should_training_stop = True
