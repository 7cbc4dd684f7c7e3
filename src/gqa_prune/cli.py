"""Command line: ``gqa-prune`` with the original research script's flags.

Thin layer: parse flags -> ``RunConfig`` -> ``run_experiment`` -> print a summary.
User errors print one line and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from gqa_prune.cli_utils import (
    UserErrorParser,
    add_data_dir_argument,
    add_model_arguments,
    add_perplexity_arguments,
    int_or_none,
)
from gqa_prune.compensation import TARGET_NORMS, TARGETS
from gqa_prune.config import (
    AGGREGATIONS,
    COMPENSATIONS,
    IMPORTANCE_CRITERIA,
    LAYER_IMPORTANCE_METHODS,
    PRESETS,
    PRUNING_MODES,
    RATIO_BASES,
    SELECTIONS,
    SENSITIVITY_WEIGHTS,
    STRATEGIES,
    RunConfig,
    preset_settings,
)
from gqa_prune.errors import GQAPruneError
from gqa_prune.recovery.cli import add_finetune_arguments


def add_allocation_arguments(g: Any, d: RunConfig) -> None:
    """The per-layer allocation flags shared by ``gqa-prune`` and ``gqa-prune search``."""
    g.add_argument(
        "--pruning_ratio",
        type=float,
        default=d.pruning_ratio,
        help="fraction of the parameters to remove, counted on --pruning_ratio_basis",
    )
    g.add_argument(
        "--pruning_ratio_basis",
        default=d.pruning_ratio_basis,
        choices=RATIO_BASES,
        help="total: all parameters (embeddings count, the original script's meaning); "
        "non_embedding: the transformer body (attention, MLP, norms), without the input "
        "embedding and an untied LM head",
    )
    g.add_argument(
        "--pruning_mode",
        default=d.pruning_mode,
        choices=PRUNING_MODES,
        help="layer: per-layer budgets from layer importance; global: cheapest "
        "units across layers by score per parameter; sensitivity: cheapest units across "
        "layers by the error the lstsq refit leaves (measured error curves; no layer "
        "importance or unit scores needed; with --pruning_distribution auto the curves also "
        "split attention and MLP)",
    )
    g.add_argument(
        "--sensitivity_weights",
        default=d.sensitivity_weights,
        choices=SENSITIVITY_WEIGHTS,
        help="--pruning_mode sensitivity: how each token's refit error is priced. stream "
        "(default): relative to the residual stream entering the layer; gradient: by the "
        "squared loss gradient at the layer's output (counts the layers above; one more "
        "forward and a layer-wise backward over the calibration set)",
    )
    g.add_argument(
        "--pruning_strategy",
        default=d.pruning_strategy,
        choices=STRATEGIES,
        help="how layer importance becomes rates: inverse = important layers lose less; "
        "proportional = they lose more; uniform = one rate for every prunable layer",
    )
    g.add_argument(
        "--alpha",
        "--layer_importance_weight",
        dest="alpha",
        type=float,
        default=d.alpha,
        help="strength of the importance weighting",
    )
    g.add_argument(
        "--min_pruning_rate",
        type=float,
        default=d.min_pruning_rate,
        help="lowest share of its attention+MLP parameters a prunable layer loses",
    )
    g.add_argument(
        "--max_pruning_rate",
        type=float,
        default=d.max_pruning_rate,
        help="highest share of its attention+MLP parameters a prunable layer loses",
    )
    g.add_argument(
        "--freeze_top_n_layers",
        type=int,
        default=d.freeze_top_n_layers,
        help="keep the N most important layers (of the prunable range) whole",
    )
    g.add_argument(
        "--layer_start",
        type=int_or_none,
        default=d.layer_start,
        help="first prunable layer, counted from 0 (none = 0)",
    )
    g.add_argument(
        "--layer_end",
        type=int_or_none,
        default=d.layer_end,
        help="one past the last prunable layer (none = the number of layers)",
    )
    g.add_argument(
        "--mlp_round_to",
        type=int,
        default=d.mlp_round_to,
        help="kept MLP widths are multiples of this (8/64/128 run faster)",
    )
    g.add_argument(
        "--allow_attention_removal",
        action="store_true",
        help="a layer may lose all its GQA groups: its attention block is removed",
    )


def add_layer_importance_arguments(g: Any, d: RunConfig) -> None:
    """``--layer_importance_method`` and ``--layer_importance_samples``."""
    g.add_argument(
        "--layer_importance_method",
        default=d.layer_importance_method,
        choices=LAYER_IMPORTANCE_METHODS,
        help="removal: loss increase when the layer is skipped; activation: mean norm of the "
        "layer's output; block_influence: 1 - cos(input, output) (ShortGPT, one forward)",
    )
    g.add_argument(
        "--layer_importance_samples",
        type=int,
        default=d.layer_importance_samples,
        help="calibration sequences (of --taylor_seq_len tokens) for layer importance",
    )


def add_unit_importance_arguments(g: Any, d: RunConfig) -> None:
    """The unit-score flags: criterion, aggregation and the gradients' calibration."""
    g.add_argument(
        "--importance",
        default=d.importance,
        choices=IMPORTANCE_CRITERIA,
        help="score of a GQA group / MLP channel (used by --selection score and "
        "--pruning_mode global)",
    )
    g.add_argument(
        "--aggregation",
        default=d.aggregation,
        choices=AGGREGATIONS,
        help="how a unit's element scores combine",
    )
    g.add_argument(
        "--channel_importance_samples",
        type=int,
        default=d.channel_importance_samples,
        help="calibration sequences (of --taylor_seq_len tokens) for the Taylor gradients and, "
        "with --pruning_mode sensitivity, for its error curves and gradient weights",
    )
    g.add_argument(
        "--taylor_seq_len",
        type=int,
        default=d.taylor_seq_len,
        help="tokens per calibration sequence of the layer analysis and the unit scores",
    )
    g.add_argument(
        "--taylor_batch_size",
        type=int,
        default=d.taylor_batch_size,
        help="sequences per forward/backward batch (lower it to save memory)",
    )


def add_compensation_arguments(g: Any, d: RunConfig) -> None:
    """The repair flags: method, calibration windows, ridge, selection and refit target."""
    g.add_argument(
        "--compensation",
        default=d.compensation,
        choices=COMPENSATIONS,
        help="none: plain deletion; lstsq: ridge refit of o_proj/down_proj kept "
        "columns; bias: FLAP mean contribution as an output bias",
    )
    g.add_argument(
        "--compensation_samples",
        type=int,
        default=d.compensation_samples,
        help="calibration sequences (of --compensation_seq_len tokens) for compensation",
    )
    g.add_argument(
        "--compensation_seq_len",
        type=int,
        default=d.compensation_seq_len,
        help="tokens per compensation sequence",
    )
    g.add_argument(
        "--compensation_damp",
        type=float,
        default=d.compensation_damp,
        help="lstsq ridge strength, relative to the mean diagonal of the Gram matrix",
    )
    g.add_argument(
        "--selection",
        default="auto",
        choices=("auto", *SELECTIONS),
        help="which units each layer loses (its counts come from the allocation): score = "
        "lowest importance score; repair = least error left after the lstsq refit "
        "(greedy structured OBS on the compensation's Gram matrices; needs lstsq; no "
        "backward pass); auto (default) = repair with --compensation lstsq, else score",
    )
    g.add_argument(
        "--compensation_target",
        default=d.compensation_target,
        metavar="{" + ",".join(TARGETS) + ",BETA}",
        help="what the lstsq refit reproduces: local = each projection's own dense output "
        "on the pruned inputs; dense = the dense model's output (a dense stream carried "
        "beside the pruned one corrects the error arriving from the layers below); a number "
        "BETA in [0, 1] = the blend (1-BETA) local + BETA dense",
    )
    g.add_argument(
        "--compensation_target_norm",
        default=d.compensation_target_norm,
        choices=TARGET_NORMS,
        help="the size of each token's dense target (with a dense or blended "
        "--compensation_target): dense = as the dense model has it; local = the pruned "
        "layer's own output's (the direction stays the dense model's)",
    )


def build_parser() -> argparse.ArgumentParser:
    d = RunConfig()
    p = UserErrorParser(
        prog="gqa-prune",
        description="GQA-aware unbalanced structured pruning of Hugging Face decoder LLMs.",
    )
    g = p.add_argument_group("model and output")
    add_model_arguments(g, d.base_model, d.device, d.dtype, d.seed)
    g.add_argument(
        "--save_ckpt_log_name",
        default=d.save_ckpt_log_name,
        help="experiment name: outputs go to <log_root>/<name>/",
    )
    g.add_argument("--log_root", default=d.log_root, help="folder holding experiment folders")
    g.add_argument("--save_model", action="store_true", help="save the pruned checkpoint to model/")
    g.add_argument("--overwrite", action="store_true", help="replace an existing saved model")
    g.add_argument(
        "--preset",
        default="default",
        choices=tuple(PRESETS),
        help="a named bundle of settings; flags given explicitly override it. knowledge: "
        "sensitivity allocation with gradient weights, a quarter of the dense outputs in "
        "the refit target, 256 compensation windows (keeps more zero-shot accuracy than the "
        "default on SmolLM2, ties it on Gemma 3, at four to six times the default's prune "
        "time; add --compensation_samples 64 for half that time)",
    )
    g.add_argument(
        "--gqa_ratio",
        type=int,
        default=None,
        help="compatibility only: must equal the config's Q:KV ratio",
    )
    g.add_argument(
        "--head_dim",
        type=int,
        default=None,
        help="compatibility only: must equal the config's head_dim",
    )

    g = p.add_argument_group("memory (models larger than the device; gqa_prune.streaming)")
    g.add_argument(
        "--streaming",
        action="store_true",
        help="one decoder layer on the device at a time; the others wait in CPU RAM "
        "(or on disk with --offload_dir); same plan as in memory",
    )
    g.add_argument(
        "--max_memory",
        default=d.max_memory,
        help="cap of the compute device, e.g. 20GiB or 500MB; without --streaming, "
        "streams only when the in-memory run would not fit",
    )
    g.add_argument(
        "--offload_dir",
        default=d.offload_dir,
        help="keep the decoder layers on disk here (implies --streaming)",
    )

    g = p.add_argument_group("data")
    add_data_dir_argument(g)
    g.add_argument(
        "--calibration_dataset",
        default=d.calibration_dataset,
        help="name (wikitext2, ptb, c4), text file, or a comma list of them (joined); "
        "a non-test split is used",
    )
    g.add_argument("--eval_dataset", default=d.eval_dataset, help="name or text file (test split)")

    g = p.add_argument_group("1. layer importance")
    add_layer_importance_arguments(g, d)
    g.add_argument(
        "--skip_importance_analysis",
        action="store_true",
        help="reuse a saved layer importance (needs --layer_importance_config)",
    )
    g.add_argument(
        "--layer_importance_config", default=None, help="layer_importance_config.json to reuse"
    )

    g = p.add_argument_group("2. per-layer allocation")
    add_allocation_arguments(g, d)
    g.add_argument(
        "--pruning_distribution",
        default=d.pruning_distribution,
        help="attention:MLP share of removed parameters (a:m), or auto = equal rates",
    )
    g.add_argument("--prune_mlp", action="store_true", help="prune MLP channels too")

    g = p.add_argument_group("3. unit importance")
    add_unit_importance_arguments(g, d)

    g = p.add_argument_group("4. compensation (repair the weights that stay, layer by layer)")
    add_compensation_arguments(g, d)

    g = p.add_argument_group("5. evaluation")
    g.add_argument("--test_original_ppl", action="store_true", help="perplexity before pruning")
    g.add_argument("--test_after_prune", action="store_true", help="perplexity after pruning")
    add_perplexity_arguments(g, d.eval_seq_len, d.eval_max_windows, d.eval_batch_size)
    # --- zero-shot and efficiency (gqa_prune.evaluation) ---
    g.add_argument(
        "--eval_tasks",
        default=d.eval_tasks,
        help="lm-evaluation-harness tasks before and after pruning, e.g. "
        "boolq,piqa,hellaswag; zeroshot6 = piqa,arc_easy,arc_challenge,boolq,winogrande,"
        "openbookqa, read from local files when --zeroshot_data_dir or <data_dir>/zeroshot "
        "exists (needs pip install 'gqa-prune[eval]')",
    )
    g.add_argument(
        "--eval_limit",
        type=int_or_none,
        default=d.eval_limit,
        help="the first N items of each zero-shot task (none = all)",
    )
    g.add_argument(
        "--eval_include_path",
        default=d.eval_include_path,
        help="folder of extra lm-eval task YAML files (local tasks, offline)",
    )
    g.add_argument(
        "--zeroshot_data_dir",
        default=d.zeroshot_data_dir,
        help="folder of <task>/<split>.jsonl files for the standard zero-shot tasks "
        "(default: <data_dir>/zeroshot if it exists, else the hub)",
    )
    g.add_argument(
        "--measure_speed",
        action="store_true",
        help="prefill/decode tokens/s and peak memory, dense vs pruned",
    )
    # --- end zero-shot and efficiency ---
    add_finetune_arguments(p)  # 6. recovery fine-tuning (gqa_prune.recovery)
    return p


def config_from_args(argv: Sequence[str] | None = None) -> RunConfig:
    """The run's settings: ``--preset``'s bundle as the defaults, then the flags given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    parser.set_defaults(**preset_settings(parser.parse_known_args(argv)[0].preset))
    values: dict[str, Any] = vars(parser.parse_args(argv))
    del values["preset"]  # its settings are in the values; the command line keeps its name
    return RunConfig(**values, command=["gqa-prune", *argv])


def _removed_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """Removed share of all and of the non-embedding parameters; the target on its basis."""
    basis = summary.get("pruning_ratio_basis", "total")
    rows = []
    for key, label in (("total", "removed (total)"), ("non_embedding", "removed (non-embedding)")):
        value = summary.get(f"actual_ratio_{key}")
        if value is not None:
            target = f" (target {100 * summary['target_ratio']:.2f}%)" if key == basis else ""
            rows.append((label, f"{100 * value:.2f}%{target}"))
    return rows


def format_summary(summary: dict[str, Any]) -> str:
    """The final console table."""
    rows = [
        ("parameters before", f"{summary['params_before']:,}"),
        ("parameters after", f"{summary['params_after']:,}"),
        *_removed_rows(summary),
        ("removed (attention+MLP)", f"{100 * summary['actual_ratio_attention_mlp']:.2f}%"),
        (
            "GQA ratio kept in every layer",
            f"{summary['gqa_ratio_kept_in_every_layer']} ({summary['gqa_ratio']}:1)",
        ),
    ]
    for key, res in summary["perplexity"].items():
        rows.append(
            (
                f"perplexity {key}",
                f"{res['ppl']:.3f} ({res['dataset']}, seq_len {res['seq_len']}, "
                f"{res['num_tokens']:,} tokens)",
            )
        )
    if "finetune" in summary:
        ft = summary["finetune"]
        loss = "n/a" if ft["final_loss"] is None else f"{ft['final_loss']:.4f}"
        rows.append(
            (
                "fine-tuning",
                f"{ft['method']}: {ft['steps']} steps, {ft['tokens']:,} "
                f"tokens, {ft['wall_time_s']:.1f} s, final loss {loss}",
            )
        )
        if ft.get("message"):
            rows.append(("fine-tuning stopped", ft["message"]))
    if "efficiency" in summary:
        ratio = summary["efficiency"]["pruned_over_dense"]
        rows.append(
            (
                "speed pruned / dense",
                f"prefill {ratio['prefill']:.2f}x, decode {ratio['decode']:.2f}x",
            )
        )
    if "peak_memory" in summary:
        mem = summary["peak_memory"]
        text = f"CPU RSS {mem['cpu_max_rss_gib']:.2f} GiB"
        if mem.get("cuda_max_allocated_gib") is not None:
            text += f", CUDA allocated {mem['cuda_max_allocated_gib']:.2f} GiB"
        if "streaming" in summary:
            text += f" (streaming, layers on {summary['streaming']['layers_rest_on']})"
        rows.append(("peak memory", text))
    width = max(len(k) for k, _ in rows)
    text = "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
    if summary.get("zeroshot"):  # per task and stage, with the drop from dense
        from gqa_prune.evaluation.zeroshot import ZeroShotResult, format_zeroshot_table

        results = {k: ZeroShotResult.from_dict(v) for k, v in summary["zeroshot"].items()}
        text += "\nzero-shot accuracy\n" + format_zeroshot_table(results)
    return text


# Sub-commands: name -> "module:function"; the function takes the remaining arguments and
# returns an exit status. Imported lazily so that `gqa-prune --help` stays fast.
SUBCOMMANDS: dict[str, str] = {
    "search": "gqa_prune.search_cli:search_main",
    "bench-speed": "gqa_prune.evaluation.cli:bench_speed_main",
    "export-gguf": "gqa_prune.export.cli:export_gguf_main",
}


def _prune(argv: Sequence[str]) -> int:
    from gqa_prune.runner import run_experiment

    summary = run_experiment(config_from_args(argv))
    print(format_summary(summary))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``gqa-prune [SUBCOMMAND] ...``: without a sub-command, prune (the original flags)."""
    import importlib

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] in SUBCOMMANDS:
            module, func = SUBCOMMANDS[args[0]].split(":")
            return int(getattr(importlib.import_module(module), func)(args[1:]))
        return _prune(args)
    except GQAPruneError as exc:
        print(f"gqa-prune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gqa-prune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
