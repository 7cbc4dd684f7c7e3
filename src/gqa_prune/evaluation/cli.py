"""Sub-commands ``gqa-prune search`` and ``gqa-prune bench-speed``: parse -> one API call -> print.

Both are registered in ``gqa_prune.cli.SUBCOMMANDS``; user errors raise ``GQAPruneError``,
which ``gqa_prune.cli.main`` prints as one line (exit status 2).
"""

from __future__ import annotations

import argparse
import gc
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import torch

from gqa_prune.cli import add_allocation_arguments
from gqa_prune.compensation import TARGET_NORMS, TARGETS
from gqa_prune.config import (
    AGGREGATIONS,
    COMPENSATIONS,
    IMPORTANCE_CRITERIA,
    LAYER_IMPORTANCE_METHODS,
    SELECTIONS,
    RunConfig,
)
from gqa_prune.errors import GQAPruneError

SEARCH_JSON = "search.json"
SEARCH_PLOT = "search_distributions.png"
# the plot title's words for each --rank_by
_RANKED = {"ppl": "perplexity", "zeroshot": "zero-shot", "logprob": "right-choice log-probability"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_or_none(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def _model_arguments(p: argparse.ArgumentParser, d: RunConfig) -> None:
    p.add_argument(
        "--base_model",
        default=d.base_model,
        help="HF folder, hub id, .gguf file or built-in name (smollm2-135m)",
    )
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=d.seed)


# ----------------------------------------------------------------------------- search
def build_search_parser() -> argparse.ArgumentParser:
    d = RunConfig(save_ckpt_log_name="gqa_prune_search")
    p = _Parser(
        prog="gqa-prune search",
        description="Search the attention:MLP split of the removed parameters in one process: "
        "layer importance and unit scores once, then prune a copy per split and rank the "
        "splits by perplexity on held-out calibration (validation) text, or by zero-shot "
        "accuracy on the validation files of ARC-Easy, ARC-Challenge and OpenBookQA; never "
        "on test items.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _model_arguments(p, d)
    p.add_argument(
        "--distributions",
        required=True,
        help="comma-separated attention:MLP splits, e.g. 0:10,1:9,2:8,3:7",
    )
    p.add_argument("--log_root", default=d.log_root)
    p.add_argument(
        "--save_ckpt_log_name",
        default=d.save_ckpt_log_name,
        help=f"outputs go to <log_root>/<name>/ ({SEARCH_JSON}, {SEARCH_PLOT})",
    )
    p.add_argument("--data_dir", default=d.data_dir)
    p.add_argument(
        "--calibration_dataset",
        default=d.calibration_dataset,
        help="name or text file; its non-test split gives calibration + validation",
    )
    p.add_argument(
        "--validation_fraction",
        type=float,
        default=0.1,
        help="share of the calibration tokens (the end) held out for validation",
    )
    g = p.add_argument_group("allocation (as in gqa-prune; MLP pruning is always on)")
    add_allocation_arguments(g, d)
    g = p.add_argument_group("importance (computed once, shared by every split)")
    g.add_argument(
        "--layer_importance_method",
        default=d.layer_importance_method,
        choices=LAYER_IMPORTANCE_METHODS,
    )
    g.add_argument("--layer_importance_samples", type=int, default=d.layer_importance_samples)
    g.add_argument("--importance", default=d.importance, choices=IMPORTANCE_CRITERIA)
    g.add_argument("--aggregation", default=d.aggregation, choices=AGGREGATIONS)
    g.add_argument("--channel_importance_samples", type=int, default=d.channel_importance_samples)
    g.add_argument("--taylor_seq_len", type=int, default=d.taylor_seq_len)
    g.add_argument("--taylor_batch_size", type=int, default=d.taylor_batch_size)
    g = p.add_argument_group("compensation (repeated per split: it depends on the plan)")
    g.add_argument("--compensation", default=d.compensation, choices=COMPENSATIONS)
    g.add_argument("--compensation_samples", type=int, default=d.compensation_samples)
    g.add_argument("--compensation_damp", type=float, default=d.compensation_damp)
    g.add_argument("--selection", default="auto", choices=("auto", *SELECTIONS))
    g.add_argument(
        "--compensation_target",
        default=d.compensation_target,
        metavar="{" + ",".join(TARGETS) + ",BETA}",
        help="local, dense or a blend BETA in [0, 1] (as gqa-prune)",
    )
    g.add_argument(
        "--compensation_target_norm",
        default=d.compensation_target_norm,
        choices=TARGET_NORMS,
        help="dense or local: the size of each token's dense target (as gqa-prune)",
    )
    g = p.add_argument_group("validation perplexity")
    g.add_argument("--eval_seq_len", type=int, default=d.eval_seq_len)
    g.add_argument("--eval_max_windows", type=_int_or_none, default=d.eval_max_windows)
    g.add_argument("--eval_batch_size", type=int, default=d.eval_batch_size)
    g = p.add_argument_group("ranking (validation data only)")
    g.add_argument(
        "--rank_by",
        default="ppl",
        choices=["ppl", "zeroshot", "logprob"],
        help="ppl: validation perplexity; zeroshot: mean acc_norm (acc where a task has none) "
        "on the zero-shot tasks' validation files; logprob: the same tasks' mean "
        "log-probability of the right choice, finer where accuracy sits near chance (both "
        "need pip install 'gqa-prune[eval]')",
    )
    g.add_argument(
        "--zeroshot_tasks",
        default="zeroshot6",
        help="tasks of --rank_by zeroshot, on their validation split (zeroshot6 = arc_easy, "
        "arc_challenge, openbookqa: the ones with validation files)",
    )
    g.add_argument(
        "--zeroshot_limit",
        type=_int_or_none,
        default=None,
        help="the first N validation items per task (default: all)",
    )
    g.add_argument(
        "--zeroshot_data_dir",
        default=None,
        help="folder of <task>/validation.jsonl (default: <data_dir>/zeroshot)",
    )
    return p


def search_main(argv: Sequence[str]) -> int:
    """``gqa-prune search``: print the candidates' table; write the JSON and the plot."""
    from gqa_prune.data import load_text
    from gqa_prune.evaluation.tasks import zeroshot_folder
    from gqa_prune.io_utils import write_json_atomic
    from gqa_prune.models.loading import load_model
    from gqa_prune.reporting.experiment import ExperimentDir, setup_logging
    from gqa_prune.reporting.search_plots import format_search_table, plot_search
    from gqa_prune.runner import allocation_config
    from gqa_prune.search import (
        ZEROSHOT_RANKINGS,
        SearchConfig,
        parse_distributions,
        search_distributions,
    )

    args = vars(build_search_parser().parse_args(list(argv)))
    distributions = parse_distributions(args.pop("distributions"))
    validation_fraction = args.pop("validation_fraction")
    ranking = {k: args.pop(k) for k in ("rank_by", "zeroshot_tasks", "zeroshot_limit")}
    zeroshot_dir = args.pop("zeroshot_data_dir")
    run = RunConfig(**args, prune_mlp=True)  # validates the shared flags
    if ranking["rank_by"] in ZEROSHOT_RANKINGS:
        folder = zeroshot_folder(zeroshot_dir, run.data_dir)
        zeroshot_dir = None if folder is None else str(folder)
    config = SearchConfig(
        distributions=distributions,
        allocation=allocation_config(run),
        mode=run.pruning_mode,  # type: ignore[arg-type]
        layer_importance_method=run.layer_importance_method,
        layer_importance_samples=run.layer_importance_samples,
        criterion=run.importance,
        aggregation=run.aggregation,
        calibration_samples=run.channel_importance_samples,
        seq_len=run.taylor_seq_len,
        batch_size=run.taylor_batch_size,
        validation_fraction=validation_fraction,
        eval_seq_len=run.eval_seq_len,
        eval_max_windows=run.eval_max_windows,
        eval_batch_size=run.eval_batch_size,
        compensation=run.compensation,
        compensation_samples=run.compensation_samples,
        compensation_damp=run.compensation_damp,
        selection=run.selection,
        compensation_target=run.compensation_target,
        compensation_target_norm=run.compensation_target_norm,
        seed=run.seed,
        zeroshot_data_dir=zeroshot_dir,
        **ranking,
    )
    exp = ExperimentDir(run)
    exp.check_overwrite()  # the output folder must be writable before the costly part
    setup_logging(None)
    torch.manual_seed(run.seed)
    text = load_text(run.calibration_dataset, "calibration", run.data_dir)
    model, tokenizer = load_model(run.base_model, dtype=run.dtype, device=run.device)
    result = search_distributions(model, tokenizer, text, config, dataset=run.calibration_dataset)
    write_json_atomic(
        exp.path(SEARCH_JSON),
        {
            "base_model": run.base_model,
            "settings": {
                **args,
                "validation_fraction": validation_fraction,
                "distributions": [list(dd) for dd in distributions],
                **ranking,
                "zeroshot_data_dir": zeroshot_dir,
            },
            **result.to_dict(),
        },
    )
    plot_search(
        exp.path(SEARCH_PLOT),
        result,
        title=f"{run.base_model}: split search at {100 * run.pruning_ratio:.0f}% pruning "
        f"(ranked by validation {_RANKED[result.rank_by]})",
    )
    print(format_search_table(result))
    print(f"wrote {exp.path(SEARCH_JSON)} and {exp.path(SEARCH_PLOT)}")
    return 0


# ------------------------------------------------------------------------- bench-speed
def build_speed_parser() -> argparse.ArgumentParser:
    d = RunConfig()
    p = _Parser(
        prog="gqa-prune bench-speed",
        description="Parameters, size, prefill / decode tokens per second and peak memory of "
        "the dense and the pruned model, one after the other on the same device.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _model_arguments(p, d)
    p.add_argument(
        "--pruned", required=True, help="pruned checkpoint folder (prune_log/NAME/model)"
    )
    p.add_argument("--prompt_len", type=int, default=128, help="prompt tokens per sequence")
    p.add_argument("--new_tokens", type=int, default=32, help="greedy decode steps")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed runs (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    p.add_argument("--output", default=None, help="also write the figures to this JSON file")
    return p


def _weights_on_disk(source: str) -> Path | None:
    path = Path(source).expanduser()
    return path if path.is_dir() else None


def bench_speed_main(argv: Sequence[str]) -> int:
    """``gqa-prune bench-speed``: measure dense, free it, measure pruned; print the table."""
    from gqa_prune.evaluation.efficiency import (
        check_speed_settings,
        format_speed_table,
        measure_speed,
        speedup,
    )
    from gqa_prune.io_utils import write_json_atomic
    from gqa_prune.models.loading import load_model
    from gqa_prune.reporting.experiment import setup_logging

    args = build_speed_parser().parse_args(list(argv))
    if not Path(args.pruned).expanduser().is_dir():
        raise GQAPruneError(f"--pruned {args.pruned} is not a folder; pass a saved pruned model")
    check_speed_settings(
        args.prompt_len, args.new_tokens, args.batch_size, args.repeats, args.warmup
    )
    setup_logging(None, verbose=False)
    logging.getLogger("gqa_prune").setLevel(logging.WARNING)
    settings = dict(
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        batch_size=args.batch_size,
        repeats=args.repeats,
        warmup=args.warmup,
        seed=args.seed,
    )
    results = []
    for label, source in (("dense", args.base_model), ("pruned", args.pruned)):
        model, _ = load_model(source, dtype=args.dtype, device=args.device)
        results.append(
            measure_speed(model, label=label, checkpoint=_weights_on_disk(source), **settings)
        )
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if args.output:
        write_json_atomic(
            args.output,
            {
                "dense": results[0].to_dict(),
                "pruned": results[1].to_dict(),
                "pruned_over_dense": speedup(*results),
            },
        )
    print(format_speed_table(results))
    return 0
