"""One pruning experiment end to end: load, calibrate, evaluate, prune, evaluate, save."""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch

from gqa_prune.allocation import AllocationConfig, allocate
from gqa_prune.analysis import (
    FILE_NAME as LAYER_IMPORTANCE_FILE,
)
from gqa_prune.analysis import (
    LayerImportance,
    compute_layer_importance,
    load_layer_importance,
)
from gqa_prune.compensation import target_blend
from gqa_prune.config import RunConfig
from gqa_prune.data import (
    bos_prefix,
    compensation_windows,
    load_text,
    sample_calibration,
    tokenize_text,
)
from gqa_prune.errors import GQAPruneError
from gqa_prune.evaluation.efficiency import SpeedResult, measure_speed, speedup
from gqa_prune.evaluation.perplexity import PerplexityResult, evaluate_perplexity
from gqa_prune.evaluation.zeroshot import (
    TaskSelection,
    ZeroShotResult,
    evaluate_zeroshot,
    prepare_tasks,
    zeroshot_drop,
)
from gqa_prune.io_utils import write_json_atomic
from gqa_prune.models.adapters import get_adapter
from gqa_prune.models.checkpoint import save_pruned
from gqa_prune.models.device import resolve_device
from gqa_prune.models.geometry import GQAGeometry, heads_from_config
from gqa_prune.pipeline import PruneOutcome, needs_unit_scores, prune_model_
from gqa_prune.recovery.steps import finetune_step, prepare_finetune
from gqa_prune.reporting.experiment import ExperimentDir, setup_logging
from gqa_prune.reporting.plots import plot_pruning_strategy
from gqa_prune.reporting.report import write_report
from gqa_prune.streaming import (
    LayerStreamer,
    MemoryMonitor,
    streaming_layer_importance,
    streaming_perplexity,
)
from gqa_prune.streaming.run import load_for_run

log = logging.getLogger("gqa_prune.runner")


def check_declared_geometry(config: RunConfig, model_config: Any) -> None:
    """``--gqa_ratio`` / ``--head_dim`` are accepted for compatibility; they must match."""
    n_q, n_kv, head_dim = heads_from_config(model_config)
    if config.gqa_ratio is not None and config.gqa_ratio != n_q // n_kv:
        raise GQAPruneError(
            f"--gqa_ratio {config.gqa_ratio} contradicts the model config ({n_q} Q / {n_kv} KV "
            f"heads = {n_q // n_kv}); drop the flag, the ratio is read from the config"
        )
    if config.head_dim is not None and config.head_dim != head_dim:
        raise GQAPruneError(
            f"--head_dim {config.head_dim} contradicts the model config (head_dim {head_dim}); "
            "drop the flag, it is read from the config"
        )


def check_layer_settings(config: RunConfig, num_layers: int) -> None:
    """Layer range and freeze count must fit the model's number of layers."""
    if config.layer_start is not None and config.layer_start >= num_layers:
        raise GQAPruneError(
            f"--layer_start {config.layer_start} is out of range: the model has {num_layers} "
            f"layers (0..{num_layers - 1})"
        )
    if config.layer_end is not None and config.layer_end > num_layers:
        raise GQAPruneError(
            f"--layer_end {config.layer_end} is out of range: the model has {num_layers} layers; "
            f"use at most {num_layers}"
        )
    if config.freeze_top_n_layers >= num_layers:
        raise GQAPruneError(
            f"--freeze_top_n_layers {config.freeze_top_n_layers} freezes every layer of "
            f"{num_layers}; use fewer than {num_layers}"
        )


def layer_importance_step(
    config: RunConfig,
    exp: ExperimentDir,
    model: Any,
    tokens: torch.Tensor,
    streamer: LayerStreamer | None = None,
    bos_token_id: int | None = None,
) -> LayerImportance:
    """Reuse the cached file of an earlier (interrupted) run with the same settings, or measure.

    ``bos_token_id``: start every calibration window with it (:func:`gqa_prune.data.bos_prefix`).
    """
    cached = exp.path(LAYER_IMPORTANCE_FILE)
    if cached.is_file():
        try:
            result = load_layer_importance(cached, model)
        except GQAPruneError as exc:
            log.warning("ignoring the cached layer importance: %s", exc)
        else:
            same = (result.method, result.num_samples, result.seq_len) == (
                config.layer_importance_method,
                config.layer_importance_samples,
                config.taylor_seq_len,
            )
            if same:
                log.info("layer importance: reusing the cached %s from an earlier run", cached)
                return result
    ids = sample_calibration(
        tokens,
        config.layer_importance_samples,
        config.taylor_seq_len,
        config.seed + 1,
        bos_token_id,
    )
    log.info(
        "layer importance: %s on %d x %d calibration tokens",
        config.layer_importance_method,
        *ids.shape,
    )
    if streamer is not None:
        result = streaming_layer_importance(
            streamer, ids, config.layer_importance_method, batch_size=config.taylor_batch_size
        )
    else:
        result = compute_layer_importance(
            model,
            ids,
            config.layer_importance_method,  # type: ignore[arg-type]
            batch_size=config.taylor_batch_size,
        )
    result.save(cached)
    return result


def allocation_config(config: RunConfig) -> AllocationConfig:
    return AllocationConfig(
        pruning_ratio=config.pruning_ratio,
        pruning_ratio_basis=config.pruning_ratio_basis,  # type: ignore[arg-type]
        strategy=config.pruning_strategy,  # type: ignore[arg-type]
        alpha=config.alpha,
        min_pruning_rate=config.min_pruning_rate,
        max_pruning_rate=config.max_pruning_rate,
        freeze_top_n_layers=config.freeze_top_n_layers,
        layer_start=config.layer_start,
        layer_end=config.layer_end,
        distribution=config.distribution,
        prune_mlp=config.prune_mlp,
        mlp_round_to=config.mlp_round_to,
        allow_attention_removal=config.allow_attention_removal,
    )


def layer_table(geometry: GQAGeometry) -> list[dict[str, int]]:
    return [
        {"layer": i, "q_heads": q, "kv_heads": kv, "mlp_size": m}
        for i, (q, kv, m) in enumerate(
            zip(geometry.q_heads, geometry.kv_heads, geometry.intermediate_sizes, strict=True)
        )
    ]


def build_summary(
    config: RunConfig,
    outcome: PruneOutcome,
    ppl: dict[str, PerplexityResult],
    timings: dict[str, float],
) -> dict[str, Any]:
    import transformers

    before, after = outcome.before, outcome.after
    removed = before.total_params - after.total_params
    prunable_removed = before.prunable_params - after.prunable_params
    ratio_ok = all(
        q == kv * before.queries_per_kv for q, kv in zip(after.q_heads, after.kv_heads, strict=True)
    )
    return {
        "base_model": config.base_model,
        "params_before": before.total_params,
        "params_after": after.total_params,
        "params_removed": removed,
        "target_ratio": config.pruning_ratio,
        "pruning_ratio_basis": config.pruning_ratio_basis,  # what target_ratio is a share of
        "embedding_params": before.embedding_params,
        "non_embedding_params_before": before.non_embedding_params,
        "non_embedding_params_after": after.non_embedding_params,
        "actual_ratio_total": removed / before.total_params,
        "actual_ratio_non_embedding": removed / before.non_embedding_params,
        "actual_ratio_attention_mlp": prunable_removed / before.prunable_params,
        "attention_ratio": 1 - sum(after.kv_heads) / sum(before.kv_heads),
        "mlp_ratio": 1 - sum(after.intermediate_sizes) / sum(before.intermediate_sizes),
        "method": {  # how the units were chosen and repaired
            "allocation": config.pruning_mode,
            "sensitivity_weights": (
                config.sensitivity_weights if config.pruning_mode == "sensitivity" else None
            ),
            "layer_importance": (
                config.layer_importance_method if needs_layer_importance(config) else None
            ),
            "selection": config.selection,
            "importance": config.importance if outcome_scored(config) else None,
            "compensation": config.compensation,
            # windows x tokens of the refit's statistics (None without a refit)
            "compensation_windows": (
                [config.compensation_samples, config.compensation_seq_len]
                if config.compensation != "none"
                else None
            ),
            "compensation_target": config.compensation_target,
            "compensation_target_norm": (  # only a dense or blended target has one
                config.compensation_target_norm
                if target_blend(config.compensation_target) > 0
                else None
            ),
        },
        "gqa_ratio": before.queries_per_kv,
        "gqa_ratio_kept_in_every_layer": ratio_ok,
        "layers": layer_table(after),
        "perplexity": {k: v.to_dict() for k, v in ppl.items()},
        "timings_s": timings,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }


def needs_layer_importance(config: RunConfig) -> bool:
    """Whether the run measures layer importance: not in ``sensitivity`` mode unless layers
    are frozen by importance (``--freeze_top_n_layers``)."""
    return config.pruning_mode != "sensitivity" or config.freeze_top_n_layers > 0


def outcome_scored(config: RunConfig) -> bool:
    """Whether the run computed unit scores (``repair`` in ``layer`` mode does not)."""
    return needs_unit_scores(config.pruning_mode, config.selection)


def run_experiment(config: RunConfig) -> dict[str, Any]:
    """Run one experiment and write its folder; returns ``summary.json``'s content.

    Every input is checked (and the model loaded) before anything is written; offloaded
    layer files of a streaming run are deleted however the run ends.
    """
    run = ExperimentRun(config)
    try:
        run.load_and_check()
        run.exp.prepare()
        setup_logging(run.exp.run_dir / "training.log")
        run.measure_layer_importance()
        run.evaluate_dense()
        run.prune()
        run.evaluate_pruned()
        run.finetune()
        return run.write_summary()
    finally:
        run.close()


class ExperimentRun:
    """The state one experiment carries from step to step (model, data, results, timings)."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.exp = ExperimentDir(config)
        self.exp.check_overwrite()
        setup_logging(None)
        torch.manual_seed(config.seed)
        self.timings: dict[str, float] = {}
        self.memory = MemoryMonitor(resolve_device(config.device))
        self.streamer: LayerStreamer | None = None  # None = the whole model on the device
        self.ppl: dict[str, PerplexityResult] = {}
        self.zeroshot: dict[str, ZeroShotResult] = {}
        self.speed: dict[str, SpeedResult] = {}
        self.finetune_record: dict[str, Any] | None = None
        self.eval_tokens: torch.Tensor | None = None
        self.compensation_ids: torch.Tensor | None = None  # the refit's windows (load)
        self.bos: int | None = None  # BOS put in front of every window (Gemma), or None
        self.importance: LayerImportance | None = None  # None: not needed (sensitivity)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time a step into ``timings[name]``."""
        t0 = time.perf_counter()
        yield
        self.timings[name] = time.perf_counter() - t0

    # ------------------------------------------------------------------ checks
    def load_and_check(self) -> None:
        """Load the model and data; validate every input before the folder is created."""
        config = self.config
        with self.step("load"):
            log.info("loading %s", config.base_model)
            self.model, self.tokenizer, self.streamer = load_for_run(config)
            adapter = get_adapter(self.model)
            check_declared_geometry(config, self.model.config)
            check_layer_settings(config, len(adapter.decoder_layers(self.model)))
        self.memory.mark("load")

        max_pos = getattr(self.model.config, "max_position_embeddings", None)
        lengths = ["taylor_seq_len"]
        if config.compensation != "none":
            lengths.append("compensation_seq_len")
        if config.test_original_ppl or config.test_after_prune:
            lengths.append("eval_seq_len")
        for name in lengths:
            if max_pos is not None and getattr(config, name) > max_pos:
                raise GQAPruneError(
                    f"--{name} {getattr(config, name)} exceeds the model's maximum of "
                    f"{max_pos} positions; use {max_pos} or less"
                )
        calib_text = load_text(config.calibration_dataset, "calibration", config.data_dir)
        self.calib_tokens = tokenize_text(self.tokenizer, calib_text)
        # windows start with BOS where the tokenizer adds one (Gemma), as the model sees text
        self.bos = bos_prefix(self.tokenizer)
        self.calibration = sample_calibration(
            self.calib_tokens,
            config.channel_importance_samples,
            config.taylor_seq_len,
            config.seed,
            self.bos,
        )
        if config.compensation != "none":  # drawn now: a text too short is refused early
            self.compensation_ids = compensation_windows(
                self.calib_tokens,
                config.compensation_samples,
                config.compensation_seq_len,
                config.seed,
                self.bos,
            )
        if config.test_original_ppl or config.test_after_prune:
            eval_text = load_text(config.eval_dataset, "eval", config.data_dir)
            self.eval_tokens = tokenize_text(self.tokenizer, eval_text)
        self.given_importance = None
        if config.skip_importance_analysis:
            self.given_importance = load_layer_importance(
                str(config.layer_importance_config), self.model
            )
        geometry = adapter.geometry(self.model)
        # Gemma-3-270M/1B: one GQA group per layer is all or nothing (logged when pruning)
        self.attention_fixed = max(geometry.kv_heads) <= 1 and not config.allow_attention_removal
        # a dry run of the allocation with equal layer importance refuses an unreachable
        # target now, not after the analysis
        allocate([1.0] * geometry.num_layers, geometry, allocation_config(config))
        # recovery: settings checked now; distill keeps the dense model as its teacher
        self.finetune_prep = (
            prepare_finetune(config, self.exp, self.model, self.tokenizer, self.calib_tokens)
            if config.finetune
            else None
        )
        # lm-eval installed, every --eval_tasks name known, local files found
        self.tasks: TaskSelection | None = None
        if config.eval_task_names:
            self.tasks = prepare_tasks(
                config.eval_task_names,
                zeroshot_data_dir=config.zeroshot_data_dir,
                data_dir=config.data_dir,
                include_path=config.eval_include_path,
            )

    # ------------------------------------------------------------------- steps
    def measure_layer_importance(self) -> None:
        config = self.config
        if not needs_layer_importance(config) and self.given_importance is None:
            log.info("layer importance: not needed by --pruning_mode sensitivity")
            return
        with self.step("layer_importance"):
            if self.given_importance is not None:
                self.importance = self.given_importance
                log.info(
                    "layer importance: reusing %s (%s)",
                    config.layer_importance_config,
                    self.importance.method,
                )
                self.importance.save(self.exp.path(LAYER_IMPORTANCE_FILE))
            else:
                self.importance = layer_importance_step(
                    config, self.exp, self.model, self.calib_tokens, self.streamer, self.bos
                )
        self.memory.mark("layer_importance")

    def perplexity(self, tokens: torch.Tensor) -> PerplexityResult:
        config = self.config
        kwargs = dict(
            seq_len=config.eval_seq_len,
            max_windows=config.eval_max_windows,
            batch_size=config.eval_batch_size,
            dataset=config.eval_dataset,
            bos_token_id=self.bos,
        )
        if self.streamer is not None:  # one layer at a time, same windows and result
            return streaming_perplexity(self.streamer, tokens, **kwargs)  # type: ignore[arg-type]
        return evaluate_perplexity(self.model, tokens, **kwargs)  # type: ignore[arg-type]

    def _evaluate_perplexity(self, stage: str, label: str) -> None:
        if self.eval_tokens is None:
            return
        with self.step(f"eval_{stage}"):
            self.ppl[stage] = self.perplexity(self.eval_tokens)
        log.info("perplexity %s: %.3f", label, self.ppl[stage].ppl)

    def _zeroshot(self, stage: str) -> None:
        if self.tasks is None:
            return
        config = self.config
        with self.step(f"zeroshot_{stage}"):
            self.zeroshot[stage] = evaluate_zeroshot(
                self.model,
                self.tokenizer,
                self.tasks,
                batch_size=config.eval_batch_size,
                limit=config.eval_limit,
                seed=config.seed,
            )

    def _speed(self, label: str, checkpoint: Path | None) -> None:
        if not self.config.measure_speed:
            return
        self.memory.mark(f"before_speed_{label}")  # measure_speed resets the peak counters
        self.speed[label] = measure_speed(
            self.model, label=label, seed=self.config.seed, checkpoint=checkpoint
        )

    def evaluate_dense(self) -> None:
        if self.config.test_original_ppl:
            self._evaluate_perplexity("before", "before pruning")
        self._zeroshot("before")
        base_dir = Path(self.config.base_model).expanduser()
        self._speed("dense", base_dir if base_dir.is_dir() else None)

    def prune(self) -> None:
        config = self.config
        with self.step("prune"):
            if self.attention_fixed:
                log.warning(
                    "attention cannot be pruned in this model: every layer has a single KV "
                    "head, so an attention block can only be kept whole or removed "
                    "(--allow_attention_removal); the MLP takes the whole budget"
                )
            self.outcome = prune_model_(
                self.model,
                self.calibration,
                allocation_config(config),
                layer_importance=None if self.importance is None else self.importance.scores,
                criterion=config.importance,
                aggregation=config.aggregation,
                mode=config.pruning_mode,  # type: ignore[arg-type]
                batch_size=config.taylor_batch_size,
                seed=config.seed,
                compensation=config.compensation,
                compensation_ids=self.compensation_ids,
                compensation_damp=config.compensation_damp,
                streaming=self.streamer,
                selection=config.selection,
                compensation_target=config.compensation_target,
                sensitivity_weights=config.sensitivity_weights,
                compensation_target_norm=config.compensation_target_norm,
            )
        self.memory.mark("prune")
        self.outcome.plan.save(self.exp.path("pruning_plan.json"))
        plot_pruning_strategy(
            self.exp.path("pruning_strategy.png"),
            self.outcome.allocation,
            None if self.importance is None else self.importance.scores,
            title=f"{config.base_model}: "
            + (
                "measured sensitivity (repair error curves)"
                if self.importance is None
                else f"{config.pruning_strategy}, {self.importance.method} importance"
            ),
        )

    def evaluate_pruned(self) -> None:
        """Perplexity after pruning, save the model, zero-shot and speed of the pruned model."""
        config = self.config
        if config.test_after_prune:
            self._evaluate_perplexity("after", "after pruning")
        if config.save_model:
            with self.step("save"):
                if self.streamer is not None:  # the pruned model, whole, in CPU RAM
                    self.streamer.gather_("cpu")
                save_pruned(self.model, self.tokenizer, self.exp.model_dir, config.overwrite)
            log.info("saved the pruned model to %s", self.exp.model_dir)
        self._zeroshot("after")
        self._speed("pruned", self.exp.model_dir if config.save_model else None)

    def finetune(self) -> None:
        """Recovery: train, plot, save model_finetuned/ (only with --finetune)."""
        if self.finetune_prep is None:
            return
        evaluate = None
        if self.config.test_after_prune and self.eval_tokens is not None:
            evaluate = partial(self.perplexity, self.eval_tokens)
        self.finetune_record = finetune_step(
            self.config,
            self.exp,
            self.model,
            self.tokenizer,
            self.finetune_prep,
            evaluate,
            self.ppl,
            self.timings,
        )
        self._zeroshot("after_finetune")

    def write_summary(self) -> dict[str, Any]:
        """``summary.json`` and ``report.html``; returns the summary."""
        self.memory.mark("end")
        summary = build_summary(self.config, self.outcome, self.ppl, self.timings)
        summary["peak_memory"] = self.memory.report()
        if self.streamer is not None:
            summary["streaming"] = self.streamer.describe()
        summary["layer_importance"] = {
            "method": None if self.importance is None else self.importance.method,
            "scores": [] if self.importance is None else list(self.importance.scores),
        }
        summary["allocation"] = self.outcome.allocation.to_dict()
        if self.finetune_record is not None:
            summary["finetune"] = self.finetune_record
        if self.zeroshot:
            summary["zeroshot"] = {k: v.to_dict() for k, v in self.zeroshot.items()}
            if "before" in self.zeroshot:  # dense - pruned (and - recovered), per task
                summary["zeroshot_drop"] = {
                    k: zeroshot_drop(self.zeroshot["before"], v)
                    for k, v in self.zeroshot.items()
                    if k != "before"
                }
        if self.speed:
            summary["efficiency"] = {
                **{k: v.to_dict() for k, v in self.speed.items()},
                "pruned_over_dense": speedup(self.speed["dense"], self.speed["pruned"]),
            }
        write_json_atomic(self.exp.path("summary.json"), summary)
        write_report(self.exp.root)  # report.html, built from summary.json and the figures
        return summary

    def close(self) -> None:
        """Delete offloaded layer files (streaming with --offload_dir)."""
        if self.streamer is not None:
            self.streamer.close()
