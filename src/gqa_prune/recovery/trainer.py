"""``finetune_``: recover a pruned model with the transformers ``Trainer`` (and peft for LoRA).

Everything distributed is the Trainer's: launched with ``accelerate launch`` it runs DDP (or
FSDP / DeepSpeed from the accelerate config) with no code of ours. What is ours:

- the data: a non-test token stream packed into full sequences (``recovery.data``);
- the loss for distillation: ``RecoveryTrainer.compute_loss`` (math in ``recovery.distill``);
- precision: the trained weights are fp32 master weights (full / distill cast the student to
  fp32, LoRA adapters are fp32); bf16 enters only through the Trainer's autocast
  (``bf16=True``), and only on a CUDA device that supports it. Never pure-fp16 AdamW;
- the guards: clipping (``max_grad_norm``), warm-up + schedule, ``NonFiniteGuard``.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from gqa_prune.data import bos_prefix
from gqa_prune.errors import GQAPruneError
from gqa_prune.recovery.config import FinetuneConfig, FinetuneResult
from gqa_prune.recovery.data import PackedDataset, build_dataset, finetune_tokens
from gqa_prune.recovery.distill import distillation_loss, teacher_targets
from gqa_prune.recovery.guards import LossHistory, NonFiniteGuard
from gqa_prune.recovery.lora import apply_lora, merge_lora

log = logging.getLogger(__name__)

# --finetune_scheduler -> transformers lr_scheduler_type (all with linear warm-up first)
SCHEDULER_TYPES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


class RecoveryTrainer(Trainer):
    """A ``Trainer`` whose loss is the model's CE or, with a teacher, the distillation loss.

    Args:
        teacher: frozen unpruned model; None = plain next-token cross-entropy.
        distill_alpha, distill_temperature, distill_top_k: see ``FinetuneConfig``.
        *args, **kwargs: passed to ``transformers.Trainer``.
    """

    def __init__(
        self,
        *args: Any,
        teacher: nn.Module | None = None,
        distill_alpha: float = 0.5,
        distill_temperature: float = 2.0,
        distill_top_k: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher
        self.distill_alpha = distill_alpha
        self.distill_temperature = distill_temperature
        self.distill_top_k = distill_top_k
        self._term_sums: dict[str, float] = {}
        self._term_count = 0
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            teacher.to(self.args.device)
            # our loss is a per-micro-batch mean (packed batches all hold the same number of
            # tokens), so the Trainer must divide it by the accumulation steps itself
            self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teacher is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        input_ids, labels = inputs["input_ids"], inputs["labels"]
        # the teacher sees the same batch; its (B, L, V) logits are freed before the student runs
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=input_ids).logits
            targets = teacher_targets(teacher_logits, self.distill_temperature, self.distill_top_k)
            del teacher_logits
        outputs = model(input_ids=input_ids)
        terms = distillation_loss(outputs.logits, targets, labels, self.distill_alpha)
        if model.training:
            for name, value in (("kl", terms.kl), ("ce", terms.ce)):
                self._term_sums[name] = self._term_sums.get(name, 0.0) + float(value.detach())
            self._term_count += 1
        return (terms.loss, outputs) if return_outputs else terms.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._term_count:  # this process's KD terms, averaged since last log
            logs.update({k: v / self._term_count for k, v in self._term_sums.items()})
            self._term_sums, self._term_count = {}, 0
        super().log(logs, start_time)


def use_bf16_autocast(precision: str, device: torch.device) -> bool:
    """bf16 autocast: asked for, or ``auto`` on a CUDA device with bf16 support."""
    if precision == "fp32":
        return False
    supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "bf16" and not supported:
        raise GQAPruneError(
            "bf16 mixed precision needs a CUDA device with bf16 support; the model is on "
            f"{device}. Use precision 'auto' or 'fp32'"
        )
    return supported


def training_arguments(
    config: FinetuneConfig, device: torch.device, output_dir: str, bf16: bool
) -> TrainingArguments:
    """The Trainer settings of a recovery run (per-step logging for the guards, no checkpoints)."""
    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=config.epochs,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type=SCHEDULER_TYPES[config.scheduler],
        optim="adamw_torch",
        bf16=bf16,
        fp16=False,
        use_cpu=device.type == "cpu",
        seed=config.seed,
        data_seed=config.seed,
        logging_strategy="steps",
        logging_steps=1,
        logging_nan_inf_filter=False,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        include_num_input_tokens_seen="all",
        remove_unused_columns=False,
        dataloader_pin_memory=device.type == "cuda",
    )


def check_finetune_inputs(
    model: Any, config: FinetuneConfig, tokens: torch.Tensor, teacher: Any | None
) -> None:
    """Refuse, before any training, settings that cannot work with this model and text."""
    if config.method == "distill" and teacher is None:
        raise GQAPruneError(
            "--finetune_method distill needs the unpruned model as teacher (finetune_(..., "
            "teacher=dense_model)); the CLI keeps a copy of it before pruning"
        )
    if config.method != "distill" and teacher is not None:
        raise GQAPruneError(
            f"a teacher was given but --finetune_method is {config.method}; use distill or "
            "drop the teacher"
        )
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and config.seq_len > max_pos:
        raise GQAPruneError(
            f"--finetune_seq_len {config.seq_len} exceeds the model's maximum of {max_pos} "
            f"positions; use {max_pos} or less"
        )
    if tokens.numel() < config.seq_len:
        raise GQAPruneError(
            f"the fine-tuning text has {tokens.numel()} tokens, fewer than one sequence of "
            f"--finetune_seq_len {config.seq_len}; use a longer text or a shorter sequence"
        )
    if teacher is not None:
        v_s = model.get_output_embeddings().weight.shape[0]
        v_t = teacher.get_output_embeddings().weight.shape[0]
        if v_s != v_t:
            raise GQAPruneError(
                f"teacher vocabulary ({v_t}) differs from the student's ({v_s}); distill from "
                "the model that was pruned"
            )


def finetune_(
    model: Any,
    tokenizer: Any,
    config: FinetuneConfig,
    teacher: nn.Module | None = None,
    *,
    tokens: torch.Tensor | None = None,
    dataset: PackedDataset | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    output_dir: str | None = None,
) -> FinetuneResult:
    """Fine-tune a (pruned) model in place to recover quality.

    LoRA adapters are merged into the weights before returning, so ``model`` keeps its
    pruned shapes, its dtype and its class, and saves with ``save_pruned``. On a non-finite
    loss, gradient norm or weight, training stops, the last good weights are restored and
    ``result.stopped_at_step`` / ``result.message`` name the step (no exception).

    Args:
        model: a supported causal LM (pruned or not).
        tokenizer: used to tokenise ``config.dataset`` when neither ``tokens`` nor
            ``dataset`` is given.
        config: method and hyper-parameters.
        teacher: the unpruned model (``distill`` only); it is frozen and never modified.
        tokens: 1-D token stream to pack instead of loading ``config.dataset``.
        dataset: ready ``PackedDataset`` (e.g. one batch repeated, in tests).
        callbacks: extra ``TrainerCallback`` objects.
        output_dir: the Trainer's scratch folder (nothing is written with these settings);
            None = a temporary folder.

    Returns:
        A :class:`FinetuneResult` (steps, tokens, wall time, loss history, stop details).
    """
    if dataset is None:
        if tokens is None:
            tokens = finetune_tokens(tokenizer, config)
        check_finetune_inputs(model, config, tokens, teacher)
        dataset = build_dataset(tokens, config, bos_prefix(tokenizer))
    else:
        check_finetune_inputs(model, config, dataset.sequences.reshape(-1), teacher)
    device = next(model.parameters()).device
    bf16 = use_bf16_autocast(config.precision, device)
    dtypes = {p.dtype for p in model.parameters()}
    keep_dtype = next(iter(dtypes)) if len(dtypes) == 1 else None
    use_cache = getattr(model.config, "use_cache", None)
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    torch.manual_seed(config.seed)  # LoRA initialisation

    if config.method == "lora":
        train_model: nn.Module = apply_lora(model, config)
    else:
        model.float()  # fp32 master weights; bf16 (if any) only through autocast
        model.requires_grad_(True)
        train_model = model
    trainable = sum(p.numel() for p in train_model.parameters() if p.requires_grad)
    log.info(
        "finetune (%s): %d sequences x %d tokens, %d trainable parameters, lr %.2e, %s",
        config.method,
        len(dataset),
        dataset.sequences.shape[1],
        trainable,
        config.learning_rate,
        "bf16 autocast" if bf16 else "fp32",
    )
    history = LossHistory(config.logging_every)
    guard = NonFiniteGuard(train_model, config.snapshot_every)
    with tempfile.TemporaryDirectory(prefix="gqa_prune_finetune_") as scratch:
        trainer = RecoveryTrainer(
            model=train_model,
            args=training_arguments(config, device, output_dir or scratch, bf16),
            train_dataset=dataset,
            data_collator=default_data_collator,
            callbacks=[history, guard, *callbacks],
            teacher=teacher if config.method == "distill" else None,
            distill_alpha=config.distill_alpha,
            distill_temperature=config.distill_temperature,
            distill_top_k=config.distill_top_k,
        )
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        t0 = time.perf_counter()
        try:
            trainer.train()
        finally:
            wall = time.perf_counter() - t0
            if config.method == "lora":
                merge_lora(train_model)
            if keep_dtype is not None and keep_dtype != torch.float32:
                model.to(keep_dtype)
            if use_cache is not None:
                model.config.use_cache = use_cache
            for name, param in model.named_parameters():
                param.requires_grad_(requires_grad.get(name, False))
            model.eval()

    state = trainer.state
    good_step = guard.restored_step if guard.stopped_at is not None else state.global_step
    good = [
        h for h in history.history if h["step"] <= (good_step or 0) and math.isfinite(h["loss"])
    ]
    return FinetuneResult(
        method=config.method,
        steps=int(good_step or 0),
        tokens=int(state.num_input_tokens_seen),
        sequences=len(dataset),
        wall_time_s=wall,
        final_loss=good[-1]["loss"] if good else None,
        loss_history=history.history,
        stopped_at_step=guard.stopped_at,
        restored_step=guard.restored_step,
        message=guard.message,
        trainable_params=trainable,
    )
