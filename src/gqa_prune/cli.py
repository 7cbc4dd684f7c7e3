"""Command line: ``gqa-prune`` with the original research script's flags.

Thin layer: parse flags -> ``RunConfig`` -> ``run_experiment`` -> print a summary.
User errors print one line and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from gqa_prune.config import (
    AGGREGATIONS,
    IMPORTANCE_CRITERIA,
    LAYER_IMPORTANCE_METHODS,
    PRUNING_MODES,
    STRATEGIES,
    RunConfig,
)
from gqa_prune.errors import GQAPruneError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"gqa-prune: error: {message} (see gqa-prune --help)\n")


def _positive_or_none(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def build_parser() -> argparse.ArgumentParser:
    d = RunConfig()
    p = _Parser(
        prog="gqa-prune",
        description="GQA-aware unbalanced structured pruning of Hugging Face decoder LLMs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model and output")
    g.add_argument("--base_model", default=d.base_model,
                   help="HF folder, hub id, .gguf file or built-in name (smollm2-135m)")
    g.add_argument("--save_ckpt_log_name", default=d.save_ckpt_log_name,
                   help="experiment name: outputs go to <log_root>/<name>/")
    g.add_argument("--log_root", default=d.log_root, help="folder holding experiment folders")
    g.add_argument("--save_model", action="store_true", help="save the pruned checkpoint to model/")
    g.add_argument("--overwrite", action="store_true", help="replace an existing saved model")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    g.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--gqa_ratio", type=int, default=None,
                   help="compatibility only: must equal the config's Q:KV ratio")
    g.add_argument("--head_dim", type=int, default=None,
                   help="compatibility only: must equal the config's head_dim")

    g = p.add_argument_group("data")
    g.add_argument("--data_dir", default=d.data_dir,
                   help="folder with local data copies (else $GQA_PRUNE_DATA_DIR, else the hub)")
    g.add_argument("--calibration_dataset", default=d.calibration_dataset,
                   help="name (wikitext2, ptb, c4) or text file; a non-test split is used")
    g.add_argument("--eval_dataset", default=d.eval_dataset, help="name or text file (test split)")

    g = p.add_argument_group("1. layer importance")
    g.add_argument("--layer_importance_method", default=d.layer_importance_method,
                   choices=LAYER_IMPORTANCE_METHODS)
    g.add_argument("--layer_importance_samples", type=int, default=d.layer_importance_samples,
                   help="calibration sequences (of --taylor_seq_len tokens) for layer importance")
    g.add_argument("--skip_importance_analysis", action="store_true",
                   help="reuse a saved layer importance (needs --layer_importance_config)")
    g.add_argument("--layer_importance_config", default=None,
                   help="layer_importance_config.json to reuse")

    g = p.add_argument_group("2. per-layer allocation")
    g.add_argument("--pruning_ratio", type=float, default=d.pruning_ratio,
                   help="fraction of TOTAL parameters to remove (embeddings count)")
    g.add_argument("--pruning_mode", default=d.pruning_mode, choices=PRUNING_MODES,
                   help="layer: per-layer budgets from layer importance; global: cheapest "
                        "units across layers by score per parameter")
    g.add_argument("--pruning_strategy", default=d.pruning_strategy, choices=STRATEGIES)
    g.add_argument("--alpha", "--layer_importance_weight", dest="alpha", type=float,
                   default=d.alpha, help="strength of the importance weighting")
    g.add_argument("--pruning_distribution", default=d.pruning_distribution,
                   help="attention:MLP share of removed parameters, e.g. 2:8 (default: equal rates)")
    g.add_argument("--min_pruning_rate", type=float, default=d.min_pruning_rate)
    g.add_argument("--max_pruning_rate", type=float, default=d.max_pruning_rate)
    g.add_argument("--freeze_top_n_layers", type=int, default=d.freeze_top_n_layers)
    g.add_argument("--layer_start", type=_positive_or_none, default=d.layer_start)
    g.add_argument("--layer_end", type=_positive_or_none, default=d.layer_end)
    g.add_argument("--mlp_round_to", type=int, default=d.mlp_round_to,
                   help="kept MLP widths are multiples of this (8/64/128 run faster)")
    g.add_argument("--prune_mlp", action="store_true", help="prune MLP channels too")

    g = p.add_argument_group("3. unit importance")
    g.add_argument("--importance", default=d.importance, choices=IMPORTANCE_CRITERIA,
                   help="score of a GQA group / MLP channel")
    g.add_argument("--aggregation", default=d.aggregation, choices=AGGREGATIONS,
                   help="how a unit's element scores combine")
    g.add_argument("--channel_importance_samples", type=int, default=d.channel_importance_samples,
                   help="calibration sequences for the Taylor gradients")
    g.add_argument("--taylor_seq_len", type=int, default=d.taylor_seq_len)
    g.add_argument("--taylor_batch_size", type=int, default=d.taylor_batch_size)

    g = p.add_argument_group("5. evaluation")
    g.add_argument("--test_original_ppl", action="store_true", help="perplexity before pruning")
    g.add_argument("--test_after_prune", action="store_true", help="perplexity after pruning")
    g.add_argument("--eval_seq_len", type=int, default=d.eval_seq_len)
    g.add_argument("--eval_max_windows", type=_positive_or_none, default=d.eval_max_windows,
                   help="evaluate only the first N windows (default: all)")
    g.add_argument("--eval_batch_size", type=int, default=d.eval_batch_size)
    return p


def config_from_args(argv: Sequence[str] | None = None) -> RunConfig:
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = vars(args)
    command = ["gqa-prune", *(sys.argv[1:] if argv is None else argv)]
    return RunConfig(**values, command=command)


def format_summary(summary: dict[str, Any]) -> str:
    """The final console table."""
    rows = [
        ("parameters before", f"{summary['params_before']:,}"),
        ("parameters after", f"{summary['params_after']:,}"),
        ("removed (total)", f"{100 * summary['actual_ratio_total']:.2f}% "
                            f"(target {100 * summary['target_ratio']:.2f}%)"),
        ("removed (attention+MLP)", f"{100 * summary['actual_ratio_attention_mlp']:.2f}%"),
        ("GQA ratio kept in every layer",
         f"{summary['gqa_ratio_kept_in_every_layer']} ({summary['gqa_ratio']}:1)"),
    ]
    for key, res in summary["perplexity"].items():
        rows.append((f"perplexity {key}",
                     f"{res['ppl']:.3f} ({res['dataset']}, seq_len {res['seq_len']}, "
                     f"{res['num_tokens']:,} tokens)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: Sequence[str] | None = None) -> int:
    from gqa_prune.runner import run_experiment

    try:
        config = config_from_args(argv)
        summary = run_experiment(config)
    except GQAPruneError as exc:
        print(f"gqa-prune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gqa-prune: interrupted", file=sys.stderr)
        return 130
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
