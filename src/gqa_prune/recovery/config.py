"""Settings and result of one recovery fine-tuning run (light: no torch/transformers import).

``FinetuneConfig`` is validated on construction, so ``RunConfig`` can build it to check the
``--finetune_*`` / ``--lora_*`` / ``--distill_*`` flags before anything runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from gqa_prune.errors import GQAPruneError

FinetuneMethod = Literal["lora", "full", "distill"]
LoraTargets = Literal["attention", "mlp", "all"]
Scheduler = Literal["linear", "cosine", "constant"]
Precision = Literal["auto", "fp32", "bf16"]

FINETUNE_METHODS: tuple[str, ...] = ("lora", "full", "distill")
LORA_TARGETS: tuple[str, ...] = ("attention", "mlp", "all")
SCHEDULERS: tuple[str, ...] = ("linear", "cosine", "constant")
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")

# Learning rate when none is given: LoRA trains a small low-rank update and takes a larger
# step (LLM-Pruner used 1e-4); full / distill move every weight of an already-trained model.
DEFAULT_LR: dict[str, float] = {"lora": 1e-4, "full": 2e-5, "distill": 2e-5}


@dataclass(frozen=True)
class FinetuneConfig:
    """How to recover a pruned model (each option documented once, here).

    Attributes:
        method: ``lora`` (peft adapters, merged into the weights afterwards), ``full``
            (every parameter trains) or ``distill`` (every parameter trains on
            ``alpha·T²·KL(teacher‖student) + (1−alpha)·CE`` with the unpruned model as teacher).
        lr: peak learning rate; None = ``DEFAULT_LR[method]``.
        epochs: passes over the packed sequences (fractions allowed).
        num_samples: packed sequences of ``seq_len`` tokens to train on (before ``max_tokens``).
        batch_size: sequences per device per micro-batch.
        seq_len: tokens per packed sequence (no padding: every token is a target).
        grad_accum: micro-batches per optimizer step.
        max_grad_norm: gradient clipping threshold (0 = no clipping).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps before ``scheduler`` takes over.
        scheduler: learning-rate schedule after warm-up.
        max_tokens: optional token budget; caps the sequences at ``max_tokens // seq_len``.
        dataset: non-test text source (name or file); None = the calibration source.
        data_dir: folder with local data copies (see ``gqa_prune.data``).
        lora_r, lora_alpha, lora_dropout: LoRA rank, scale numerator and dropout.
        lora_targets: which projections get adapters: ``attention`` (q/k/v/o), ``mlp``
            (gate/up/down) or ``all``; names come from the architecture adapter.
        distill_alpha: weight of the KL term (1 = pure distillation, 0 = plain CE).
        distill_temperature: softmax temperature T of teacher and student in the KL term.
        distill_top_k: keep only the teacher's k largest logits per token (renormalised
            over those k); None = the whole vocabulary.
        snapshot_every: copy the trainable weights to CPU every N optimizer steps; on a
            non-finite loss, gradient or weight the last copy is restored and training stops.
            1 = exactly the previous step's weights (costs one copy per step).
        precision: ``auto`` = bf16 autocast on CUDA devices that support it, fp32 elsewhere;
            master weights and optimizer states are always fp32 (never pure-fp16 AdamW).
        seed: seed of the packing shuffle and of the Trainer (data order, dropout).
        logging_every: log the loss to the run log every N steps (0 = about 20 lines).
    """

    method: FinetuneMethod = "lora"
    lr: float | None = None
    epochs: float = 1.0
    num_samples: int = 512
    batch_size: int = 4
    seq_len: int = 128
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    warmup_steps: int = 5
    scheduler: Scheduler = "cosine"
    max_tokens: int | None = None
    dataset: str | None = None
    data_dir: str | None = None
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: LoraTargets = "all"
    distill_alpha: float = 0.5
    distill_temperature: float = 2.0
    distill_top_k: int | None = None
    snapshot_every: int = 1
    precision: Precision = "auto"
    seed: int = 42
    logging_every: int = 0

    def __post_init__(self) -> None:
        choices: tuple[tuple[str, str, tuple[str, ...]], ...] = (
            ("--finetune_method", self.method, FINETUNE_METHODS),
            ("--lora_targets", self.lora_targets, LORA_TARGETS),
            ("--finetune_scheduler", self.scheduler, SCHEDULERS),
            ("precision", self.precision, PRECISIONS),
        )
        for flag, choice, valid in choices:
            if choice not in valid:
                raise GQAPruneError(f"unknown {flag} '{choice}'; choose one of {', '.join(valid)}")
        if self.lr is not None and not self.lr > 0:
            raise GQAPruneError(f"--finetune_lr must be > 0 (e.g. 1e-4), got {self.lr}")
        if not self.epochs > 0:
            raise GQAPruneError(f"--finetune_epochs must be > 0, got {self.epochs}")
        counts: tuple[tuple[str, int], ...] = (
            ("--finetune_samples", self.num_samples),
            ("--finetune_batch_size", self.batch_size),
            ("--finetune_grad_accum", self.grad_accum),
            ("--lora_r", self.lora_r),
            ("--finetune_snapshot_every", self.snapshot_every),
        )
        for flag, count in counts:
            if count <= 0:
                raise GQAPruneError(f"{flag} must be a positive number, got {count}")
        if self.seq_len < 2:
            raise GQAPruneError(f"--finetune_seq_len must be at least 2, got {self.seq_len}")
        non_negative: tuple[tuple[str, float], ...] = (
            ("--finetune_max_grad_norm", self.max_grad_norm),
            ("--finetune_weight_decay", self.weight_decay),
            ("--finetune_warmup_steps", self.warmup_steps),
            ("logging_every", self.logging_every),
        )
        for flag, number in non_negative:
            if number < 0:
                raise GQAPruneError(f"{flag} must be >= 0, got {number}")
        if self.max_tokens is not None and self.max_tokens < self.seq_len:
            raise GQAPruneError(
                f"--finetune_max_tokens {self.max_tokens} is less than one sequence of "
                f"--finetune_seq_len {self.seq_len} tokens; raise it or drop the flag"
            )
        if not self.lora_alpha > 0:
            raise GQAPruneError(f"--lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise GQAPruneError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise GQAPruneError(f"--distill_alpha must be in [0, 1], got {self.distill_alpha}")
        if not self.distill_temperature > 0:
            raise GQAPruneError(
                f"--distill_temperature must be > 0 (e.g. 2.0), got {self.distill_temperature}"
            )
        if self.distill_top_k is not None and self.distill_top_k <= 0:
            raise GQAPruneError(
                f"--distill_top_k must be positive (or none = whole vocabulary), got "
                f"{self.distill_top_k}"
            )

    @property
    def learning_rate(self) -> float:
        """``lr``, or the method's default."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    @property
    def num_sequences(self) -> int:
        """Packed sequences asked for: ``num_samples``, capped by ``max_tokens``."""
        if self.max_tokens is None:
            return self.num_samples
        return min(self.num_samples, self.max_tokens // self.seq_len)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# RunConfig field -> FinetuneConfig field, for the CLI flags that are named differently
RUN_FIELDS: dict[str, str] = {
    "finetune_method": "method",
    "finetune_lr": "lr",
    "finetune_epochs": "epochs",
    "finetune_samples": "num_samples",
    "finetune_batch_size": "batch_size",
    "finetune_seq_len": "seq_len",
    "finetune_grad_accum": "grad_accum",
    "finetune_max_grad_norm": "max_grad_norm",
    "finetune_weight_decay": "weight_decay",
    "finetune_warmup_steps": "warmup_steps",
    "finetune_scheduler": "scheduler",
    "finetune_max_tokens": "max_tokens",
    "finetune_snapshot_every": "snapshot_every",
    "lora_r": "lora_r",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "lora_targets": "lora_targets",
    "distill_alpha": "distill_alpha",
    "distill_temperature": "distill_temperature",
    "distill_top_k": "distill_top_k",
    "seed": "seed",
    "data_dir": "data_dir",
}


def finetune_config_from_run(run: Any) -> FinetuneConfig:
    """The ``FinetuneConfig`` of a ``RunConfig`` (validates the recovery flags).

    ``--finetune_dataset`` defaults to ``--calibration_dataset`` (a non-test split).
    """
    values = {dst: getattr(run, src) for src, dst in RUN_FIELDS.items()}
    values["dataset"] = getattr(run, "finetune_dataset", None) or run.calibration_dataset
    return FinetuneConfig(**values)


FINETUNE_DEFAULTS = FinetuneConfig()


@dataclass
class FinetuneResult:
    """What :func:`gqa_prune.recovery.finetune_` did.

    Attributes:
        method: the method that ran.
        steps: optimizer steps completed (with good weights).
        tokens: training tokens seen by the student (all devices).
        sequences: packed sequences in the training set.
        wall_time_s: seconds spent in training (excluding data preparation).
        final_loss: training loss of the last good step (None if no step ran).
        loss_history: one entry per logged step: ``step``, ``loss``, ``learning_rate``,
            ``grad_norm`` and, for distillation, ``kl`` and ``ce``.
        stopped_at_step: step at which a non-finite loss/gradient/weight stopped training;
            None if training ran to the end.
        restored_step: the step whose weights were restored after such a stop.
        message: human-readable account of a stop (names the step).
        trainable_params: parameters that received updates (LoRA: adapter parameters).
    """

    method: str
    steps: int = 0
    tokens: int = 0
    sequences: int = 0
    wall_time_s: float = 0.0
    final_loss: float | None = None
    loss_history: list[dict[str, float]] = field(default_factory=list)
    stopped_at_step: int | None = None
    restored_step: int | None = None
    message: str = ""
    trainable_params: int = 0

    @property
    def stopped_early(self) -> bool:
        return self.stopped_at_step is not None

    def to_dict(self, history: bool = False) -> dict[str, Any]:
        """JSON-ready; the per-step history only when ``history``."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        if not history:
            data.pop("loss_history")
        return data
