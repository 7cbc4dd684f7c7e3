"""One pruning experiment end to end: load, calibrate, evaluate, prune, evaluate, save."""

from __future__ import annotations

import logging
import platform
import time
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
from gqa_prune.config import RunConfig
from gqa_prune.data import load_text, sample_calibration, tokenize_text
from gqa_prune.errors import GQAPruneError
from gqa_prune.evaluation.efficiency import SpeedResult, measure_speed, speedup
from gqa_prune.evaluation.perplexity import PerplexityResult, evaluate_perplexity
from gqa_prune.evaluation.zeroshot import ZeroShotResult, evaluate_zeroshot, task_manager
from gqa_prune.io_utils import write_json_atomic
from gqa_prune.models.adapters import get_adapter
from gqa_prune.models.checkpoint import save_pruned
from gqa_prune.models.geometry import GQAGeometry, heads_from_config
from gqa_prune.models.loading import resolve_device
from gqa_prune.pipeline import PruneOutcome, prune_model_
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
) -> LayerImportance:
    """Reuse the cached file of an earlier (interrupted) run with the same settings, or measure."""
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
        tokens, config.layer_importance_samples, config.taylor_seq_len, config.seed + 1
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
        "actual_ratio_total": removed / before.total_params,
        "actual_ratio_attention_mlp": prunable_removed / before.prunable_params,
        "attention_ratio": 1 - sum(after.kv_heads) / sum(before.kv_heads),
        "mlp_ratio": 1 - sum(after.intermediate_sizes) / sum(before.intermediate_sizes),
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


def run_experiment(config: RunConfig) -> dict[str, Any]:
    """Run one experiment and write its folder; returns ``summary.json``'s content."""
    exp = ExperimentDir(config)
    exp.check_overwrite()
    setup_logging(None)
    timings: dict[str, float] = {}
    torch.manual_seed(config.seed)

    t0 = time.perf_counter()
    memory = MemoryMonitor(resolve_device(config.device))
    log.info("loading %s", config.base_model)
    # streamer: None = the whole model on config.device; else one layer at a time
    model, tokenizer, streamer = load_for_run(config)
    adapter = get_adapter(model)
    check_declared_geometry(config, model.config)
    check_layer_settings(config, len(adapter.decoder_layers(model)))
    timings["load"] = time.perf_counter() - t0
    memory.mark("load")

    calib_text = load_text(config.calibration_dataset, "calibration", config.data_dir)
    calib_tokens = tokenize_text(tokenizer, calib_text)
    calibration = sample_calibration(
        calib_tokens, config.channel_importance_samples, config.taylor_seq_len, config.seed
    )
    eval_tokens = None
    if config.test_original_ppl or config.test_after_prune:
        eval_text = load_text(config.eval_dataset, "eval", config.data_dir)
        eval_tokens = tokenize_text(tokenizer, eval_text)
        max_pos = getattr(model.config, "max_position_embeddings", None)
        if max_pos is not None and config.eval_seq_len > max_pos:
            raise GQAPruneError(
                f"--eval_seq_len {config.eval_seq_len} exceeds the model's maximum of {max_pos} "
                f"positions; use {max_pos} or less"
            )

    given_importance = None
    if config.skip_importance_analysis:
        given_importance = load_layer_importance(str(config.layer_importance_config), model)
    # every input is checked before anything is written: a dry run of the allocation with
    # equal layer importance refuses an unreachable target now, not after the analysis
    allocate(
        [1.0] * len(adapter.decoder_layers(model)),
        adapter.geometry(model),
        allocation_config(config),
    )
    # recovery: settings checked now; distill keeps the dense model as its teacher
    finetune_prep = (
        prepare_finetune(config, exp, model, tokenizer, calib_tokens) if config.finetune else None
    )
    # lm-eval installed and every --eval_tasks name known, before anything is written
    tasks = config.eval_task_names
    manager = task_manager(tasks, config.eval_include_path) if tasks else None
    exp.prepare()
    setup_logging(exp.run_dir / "training.log")

    zeroshot: dict[str, ZeroShotResult] = {}

    def zeroshot_step(stage: str) -> None:
        t0 = time.perf_counter()
        zeroshot[stage] = evaluate_zeroshot(
            model,
            tokenizer,
            tasks,
            batch_size=config.eval_batch_size,
            limit=config.eval_limit,
            include_path=config.eval_include_path,
            seed=config.seed,
            manager=manager,
        )
        timings[f"zeroshot_{stage}"] = time.perf_counter() - t0

    def perplexity(tokens: torch.Tensor) -> PerplexityResult:
        if streamer is not None:  # one layer at a time, same windows and result
            return streaming_perplexity(
                streamer,
                tokens,
                seq_len=config.eval_seq_len,
                max_windows=config.eval_max_windows,
                batch_size=config.eval_batch_size,
                dataset=config.eval_dataset,
            )
        return evaluate_perplexity(
            model,
            tokens,
            seq_len=config.eval_seq_len,
            max_windows=config.eval_max_windows,
            batch_size=config.eval_batch_size,
            dataset=config.eval_dataset,
        )

    t0 = time.perf_counter()
    if given_importance is not None:
        importance = given_importance
        log.info(
            "layer importance: reusing %s (%s)", config.layer_importance_config, importance.method
        )
        importance.save(exp.path(LAYER_IMPORTANCE_FILE))
    else:
        importance = layer_importance_step(config, exp, model, calib_tokens, streamer)
    timings["layer_importance"] = time.perf_counter() - t0
    memory.mark("layer_importance")

    ppl: dict[str, PerplexityResult] = {}
    if config.test_original_ppl and eval_tokens is not None:
        t0 = time.perf_counter()
        ppl["before"] = perplexity(eval_tokens)
        timings["eval_before"] = time.perf_counter() - t0
        log.info("perplexity before pruning: %.3f", ppl["before"].ppl)
    if tasks:
        zeroshot_step("before")
    speed: dict[str, SpeedResult] = {}
    if config.measure_speed:
        memory.mark("before_speed_dense")  # measure_speed resets the peak counters
        base_dir = Path(config.base_model).expanduser()
        speed["dense"] = measure_speed(
            model,
            label="dense",
            seed=config.seed,
            checkpoint=base_dir if base_dir.is_dir() else None,
        )

    compensation_ids = None
    if config.compensation != "none":
        compensation_ids = sample_calibration(
            calib_tokens, config.compensation_samples, config.taylor_seq_len, config.seed + 2
        )
    t0 = time.perf_counter()
    outcome = prune_model_(
        model,
        calibration,
        allocation_config(config),
        layer_importance=importance.scores,
        criterion=config.importance,
        aggregation=config.aggregation,
        mode=config.pruning_mode,  # type: ignore[arg-type]
        batch_size=config.taylor_batch_size,
        seed=config.seed,
        compensation=config.compensation,
        compensation_ids=compensation_ids,
        compensation_damp=config.compensation_damp,
        streaming=streamer,
    )
    timings["prune"] = time.perf_counter() - t0
    memory.mark("prune")
    outcome.plan.save(exp.path("pruning_plan.json"))
    plot_pruning_strategy(
        exp.path("pruning_strategy.png"),
        outcome.allocation,
        importance.scores,
        title=f"{config.base_model}: {config.pruning_strategy}, {importance.method} importance",
    )

    if config.test_after_prune and eval_tokens is not None:
        t0 = time.perf_counter()
        ppl["after"] = perplexity(eval_tokens)
        timings["eval_after"] = time.perf_counter() - t0
        log.info("perplexity after pruning: %.3f", ppl["after"].ppl)

    if config.save_model:
        t0 = time.perf_counter()
        if streamer is not None:  # the pruned model, whole, in CPU RAM
            streamer.gather_("cpu")
        save_pruned(model, tokenizer, exp.model_dir, overwrite=config.overwrite)
        timings["save"] = time.perf_counter() - t0
        log.info("saved the pruned model to %s", exp.model_dir)
    if tasks:
        zeroshot_step("after")
    if config.measure_speed:
        memory.mark("before_speed_pruned")
        speed["pruned"] = measure_speed(
            model,
            label="pruned",
            seed=config.seed,
            checkpoint=exp.model_dir if config.save_model else None,
        )

    finetune_record = None
    if finetune_prep is not None:  # recovery: train, plot, save model_finetuned/
        evaluate = None
        if config.test_after_prune and eval_tokens is not None:
            evaluate = partial(perplexity, eval_tokens)
        finetune_record = finetune_step(
            config, exp, model, tokenizer, finetune_prep, evaluate, ppl, timings
        )
        if tasks:
            zeroshot_step("after_finetune")

    memory.mark("end")
    summary = build_summary(config, outcome, ppl, timings)
    summary["peak_memory"] = memory.report()
    if streamer is not None:
        summary["streaming"] = streamer.describe()
        streamer.close()  # deletes the offloaded layer files
    summary["layer_importance"] = {"method": importance.method, "scores": list(importance.scores)}
    summary["allocation"] = outcome.allocation.to_dict()
    if finetune_record is not None:
        summary["finetune"] = finetune_record
    if zeroshot:
        summary["zeroshot"] = {k: v.to_dict() for k, v in zeroshot.items()}
    if speed:
        summary["efficiency"] = {
            **{k: v.to_dict() for k, v in speed.items()},
            "pruned_over_dense": speedup(speed["dense"], speed["pruned"]),
        }
    write_json_atomic(exp.path("summary.json"), summary)
    write_report(exp.root)  # report.html, built from summary.json and the figures
    return summary
