"""Recovery after pruning: LoRA, full fine-tuning and distillation from the unpruned model.

``finetune_(model, tokenizer, FinetuneConfig(method=...), teacher=None)`` trains in place
with the transformers ``Trainer`` (peft for LoRA) and returns a ``FinetuneResult``.
"""

from gqa_prune.recovery.config import (
    FINETUNE_METHODS,
    LORA_TARGETS,
    SCHEDULERS,
    FinetuneConfig,
    FinetuneResult,
    finetune_config_from_run,
)
from gqa_prune.recovery.data import PackedDataset, pack_tokens
from gqa_prune.recovery.distill import distillation_loss, kl_to_teacher, teacher_targets
from gqa_prune.recovery.guards import LossHistory, NonFiniteGuard
from gqa_prune.recovery.lora import apply_lora, lora_target_modules, merge_lora
from gqa_prune.recovery.plots import plot_finetune_loss
from gqa_prune.recovery.trainer import RecoveryTrainer, check_finetune_inputs, finetune_

__all__ = [
    "FINETUNE_METHODS",
    "LORA_TARGETS",
    "SCHEDULERS",
    "FinetuneConfig",
    "FinetuneResult",
    "LossHistory",
    "NonFiniteGuard",
    "PackedDataset",
    "RecoveryTrainer",
    "apply_lora",
    "check_finetune_inputs",
    "distillation_loss",
    "finetune_",
    "finetune_config_from_run",
    "kl_to_teacher",
    "lora_target_modules",
    "merge_lora",
    "pack_tokens",
    "plot_finetune_loss",
    "teacher_targets",
]
