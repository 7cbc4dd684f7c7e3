"""Run settings of one pruning experiment, validated on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gqa_prune.allocation import BASES as RATIO_BASES
from gqa_prune.analysis import layer_importance_methods
from gqa_prune.compensation import (
    COMPENSATIONS,
    DEFAULT_DAMP,
    DEFAULT_TARGET,
    DEFAULT_TARGET_NORM,
    SELECTIONS,
    SENSITIVITY_WEIGHTS,
    check_compensation,
    check_selection,
)
from gqa_prune.errors import GQAPruneError
from gqa_prune.evaluation.zeroshot import parse_tasks  # does not import lm-eval
from gqa_prune.importance import AGGREGATIONS
from gqa_prune.importance import CRITERIA as IMPORTANCE_CRITERIA
from gqa_prune.planning import PRUNING_MODES
from gqa_prune.recovery.config import FINETUNE_DEFAULTS as _FT
from gqa_prune.recovery.config import FinetuneConfig, finetune_config_from_run
from gqa_prune.streaming.memory import parse_memory
from gqa_prune.streaming.run import check_streaming_options

LAYER_IMPORTANCE_METHODS = layer_importance_methods()

STRATEGIES = ("inverse", "proportional", "uniform")


def parse_distribution(text: str | None) -> tuple[float, float] | None:
    """Parse ``a:m`` (attention:MLP share of the removed parameters); None/'auto' -> None."""
    if text is None or text == "auto":
        return None
    parts = text.split(":")
    try:
        a, m = (float(p) for p in parts)
    except ValueError:
        raise GQAPruneError(
            f"--pruning_distribution '{text}' is not of the form a:m (e.g. 2:8) or auto"
        ) from None
    if a < 0 or m < 0 or a + m == 0:
        raise GQAPruneError(
            f"--pruning_distribution '{text}' needs non-negative parts, not both zero (e.g. 2:8)"
        )
    return (a, m)


# Named bundles of settings (``gqa-prune --preset NAME``, :meth:`RunConfig.from_preset`);
# settings given explicitly override them. ``knowledge``: keeps more zero-shot accuracy than
# the default on every calibration seed in the issue-15 benchmarks (SmolLM2-135M at 25%: a
# five-task drop of 4.59 points over four seeds against the default's 5.73; Gemma-3-270M:
# tied), at four to six times the default's prune time (docs/benchmarks.md).
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "knowledge": {
        "pruning_mode": "sensitivity",
        "pruning_distribution": "auto",
        "sensitivity_weights": "gradient",
        "compensation_target": "0.25",
        "compensation_samples": 256,
    },
}


def preset_settings(name: str) -> dict[str, Any]:
    """The settings of preset ``name`` (a copy); refused with the list when unknown."""
    if name not in PRESETS:
        raise GQAPruneError(f"unknown preset '{name}'; choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a run (the CLI flags, with the original research script's names)."""

    base_model: str = "smollm2-135m"
    save_ckpt_log_name: str = "gqa_prune_run"
    log_root: str = "prune_log"
    pruning_ratio: float = 0.25
    # what pruning_ratio is a fraction of: total | non_embedding (AllocationConfig)
    pruning_ratio_basis: str = "total"
    # defaults chosen from bench/bench_allocation.py on SmolLM2-135M (see docs/benchmarks.md)
    pruning_distribution: str | None = "1:9"
    pruning_strategy: str = "inverse"
    alpha: float = 2.0
    min_pruning_rate: float = 0.0
    max_pruning_rate: float = 1.0
    freeze_top_n_layers: int = 0
    layer_start: int | None = None
    layer_end: int | None = None
    mlp_round_to: int = 1
    allow_attention_removal: bool = False
    prune_mlp: bool = False
    importance: str = "taylor"
    aggregation: str = "sum"
    channel_importance_samples: int = 32
    taylor_seq_len: int = 128
    taylor_batch_size: int = 4
    layer_importance_method: str = "removal"
    # 2 x 128 tokens: 8, 4 and 2 gave the same validation quality on SmolLM2 (25%, 50%) and
    # Gemma (bench/bench_quality.py, docs/benchmarks.md); the removal analysis costs about
    # N x (15 layers + lm_head), the largest share of the prune time at 4
    layer_importance_samples: int = 2
    skip_importance_analysis: bool = False
    layer_importance_config: str | None = None
    pruning_mode: str = "layer"
    # token weights of the sensitivity mode's error curves: stream (no backward) or gradient
    sensitivity_weights: str = "stream"
    compensation: str = "lstsq"
    compensation_samples: int = 64
    # tokens per compensation window (the layer analysis and unit scores use taylor_seq_len)
    compensation_seq_len: int = 128
    compensation_damp: float = DEFAULT_DAMP
    # auto = repair with lstsq compensation (the measured winner), else score
    selection: str = "auto"
    compensation_target: str = DEFAULT_TARGET
    compensation_target_norm: str = DEFAULT_TARGET_NORM
    calibration_dataset: str = "wikitext2"
    eval_dataset: str = "wikitext2"
    eval_seq_len: int = 128
    eval_max_windows: int | None = None
    eval_batch_size: int = 8
    test_original_ppl: bool = False
    test_after_prune: bool = False
    # --- zero-shot and efficiency (gqa_prune.evaluation) ---
    eval_tasks: str | None = None
    eval_limit: int | None = None
    eval_include_path: str | None = None
    # folder of <task>/<split>.jsonl for the standard suite (else <data_dir>/zeroshot)
    zeroshot_data_dir: str | None = None
    measure_speed: bool = False
    # --- end zero-shot and efficiency ---
    save_model: bool = False
    overwrite: bool = False
    device: str = "auto"
    dtype: str = "auto"
    # --- memory (gqa_prune.streaming) ---
    streaming: bool = False
    max_memory: str | None = None
    offload_dir: str | None = None
    # --- end memory ---
    seed: int = 42
    data_dir: str | None = None
    gqa_ratio: int | None = None
    head_dim: int | None = None
    # --- recovery fine-tuning; each option is documented in FinetuneConfig ---
    finetune: bool = False
    finetune_method: str = _FT.method
    finetune_lr: float | None = _FT.lr
    finetune_epochs: float = _FT.epochs
    finetune_samples: int = _FT.num_samples
    finetune_max_tokens: int | None = _FT.max_tokens
    finetune_batch_size: int = _FT.batch_size
    finetune_seq_len: int = _FT.seq_len
    finetune_grad_accum: int = _FT.grad_accum
    finetune_max_grad_norm: float = _FT.max_grad_norm
    finetune_weight_decay: float = _FT.weight_decay
    finetune_warmup_steps: int = _FT.warmup_steps
    finetune_scheduler: str = _FT.scheduler
    finetune_dataset: str | None = None
    finetune_snapshot_every: int = _FT.snapshot_every
    lora_r: int = _FT.lora_r
    lora_alpha: int = _FT.lora_alpha
    lora_dropout: float = _FT.lora_dropout
    lora_targets: str = _FT.lora_targets
    distill_alpha: float = _FT.distill_alpha
    distill_temperature: float = _FT.distill_temperature
    distill_top_k: int | None = _FT.distill_top_k
    # --- end recovery ---
    command: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.selection == "auto":  # frozen: resolved once, here
            object.__setattr__(
                self, "selection", "repair" if self.compensation == "lstsq" else "score"
            )
        if not 0.0 < self.pruning_ratio < 1.0:
            raise GQAPruneError(
                f"--pruning_ratio must be between 0 and 1 (exclusive), got {self.pruning_ratio}"
            )
        if not 0.0 <= self.min_pruning_rate <= self.max_pruning_rate <= 1.0:
            raise GQAPruneError(
                f"need 0 <= --min_pruning_rate <= --max_pruning_rate <= 1, got "
                f"{self.min_pruning_rate} and {self.max_pruning_rate}"
            )
        if self.alpha < 0:
            raise GQAPruneError(f"--alpha must be >= 0, got {self.alpha}")
        for name, choices in (
            ("pruning_strategy", STRATEGIES),
            ("pruning_ratio_basis", RATIO_BASES),
            ("importance", IMPORTANCE_CRITERIA),
            ("pruning_mode", PRUNING_MODES),
            ("sensitivity_weights", SENSITIVITY_WEIGHTS),
            ("compensation", COMPENSATIONS),
            ("selection", SELECTIONS),
            ("aggregation", AGGREGATIONS),
            ("layer_importance_method", LAYER_IMPORTANCE_METHODS),
        ):
            if getattr(self, name) not in choices:
                raise GQAPruneError(
                    f"unknown --{name} '{getattr(self, name)}'; choose one of {', '.join(choices)}"
                )
        if self.skip_importance_analysis and not self.layer_importance_config:
            raise GQAPruneError(
                "--skip_importance_analysis needs --layer_importance_config PATH (a "
                "layer_importance_config.json from an earlier run)"
            )
        check_selection(self.selection, self.compensation)
        if not self.compensation_damp > 0:
            raise GQAPruneError(
                f"--compensation_damp must be > 0 (e.g. {DEFAULT_DAMP}), got "
                f"{self.compensation_damp}"
            )
        # the target's own checks (dense needs lstsq), in one place
        check_compensation(
            self.compensation,
            self.compensation_damp,
            self.compensation_target,
            self.compensation_target_norm,
        )
        for name in (
            "channel_importance_samples",
            "compensation_samples",
            "layer_importance_samples",
            "taylor_batch_size",
            "eval_batch_size",
            "mlp_round_to",
        ):
            if getattr(self, name) <= 0:
                raise GQAPruneError(
                    f"--{name} must be a positive number, got {getattr(self, name)}"
                )
        for name in ("taylor_seq_len", "eval_seq_len", "compensation_seq_len"):
            if getattr(self, name) < 2:
                raise GQAPruneError(f"--{name} must be at least 2, got {getattr(self, name)}")
        if self.eval_max_windows is not None and self.eval_max_windows <= 0:
            raise GQAPruneError(f"--eval_max_windows must be positive, got {self.eval_max_windows}")
        if self.freeze_top_n_layers < 0:
            raise GQAPruneError(
                f"--freeze_top_n_layers must be >= 0, got {self.freeze_top_n_layers}"
            )
        if (
            self.layer_start is not None
            and self.layer_end is not None
            and self.layer_start >= self.layer_end
        ):
            raise GQAPruneError(
                f"--layer_start ({self.layer_start}) must be smaller than --layer_end "
                f"({self.layer_end})"
            )
        if self.layer_start is not None and self.layer_start < 0:
            raise GQAPruneError(f"--layer_start must be >= 0, got {self.layer_start}")
        if "/" in self.save_ckpt_log_name or self.save_ckpt_log_name in ("", ".", ".."):
            raise GQAPruneError(
                f"--save_ckpt_log_name '{self.save_ckpt_log_name}' must be a plain folder name"
            )
        parse_distribution(self.pruning_distribution)
        if self.max_memory is not None:
            parse_memory(self.max_memory)
        if self.streaming or self.offload_dir is not None:
            check_streaming_options(self)
        self._check_eval_tasks()
        finetune_config_from_run(self)  # validates the recovery flags (also without --finetune)

    @property
    def finetune_config(self) -> FinetuneConfig:
        """Settings of the recovery fine-tuning (``--finetune``)."""
        return finetune_config_from_run(self)

    def _check_eval_tasks(self) -> None:  # zero-shot flags
        if self.eval_tasks is not None:
            parse_tasks(self.eval_tasks)
        elif (self.eval_limit, self.eval_include_path, self.zeroshot_data_dir) != (None,) * 3:
            raise GQAPruneError(
                "--eval_limit, --eval_include_path and --zeroshot_data_dir need --eval_tasks"
            )
        if self.eval_limit is not None and self.eval_limit <= 0:
            raise GQAPruneError(f"--eval_limit must be positive, got {self.eval_limit}")
        if self.eval_include_path is not None and not Path(self.eval_include_path).is_dir():
            raise GQAPruneError(
                f"--eval_include_path {self.eval_include_path} is not a folder; pass a folder "
                "of lm-eval task YAML files"
            )
        if self.zeroshot_data_dir is not None and not Path(self.zeroshot_data_dir).is_dir():
            raise GQAPruneError(
                f"--zeroshot_data_dir {self.zeroshot_data_dir} is not a folder; pass the "
                "folder holding <task>/<split>.jsonl (e.g. DATA/zeroshot)"
            )

    @property
    def eval_task_names(self) -> tuple[str, ...]:
        """``--eval_tasks`` as a tuple (empty without the flag)."""
        return () if self.eval_tasks is None else parse_tasks(self.eval_tasks)

    @property
    def distribution(self) -> tuple[float, float] | None:
        return parse_distribution(self.pruning_distribution)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_preset(cls, name: str, **settings: Any) -> RunConfig:
        """Preset ``name``'s settings (:data:`PRESETS`), overridden by ``settings``
        (``RunConfig.from_preset("knowledge", pruning_ratio=0.3)``)."""
        return cls(**{**preset_settings(name), **settings})
