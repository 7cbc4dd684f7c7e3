"""Sub-command ``gqa-prune search``: parse -> one API call (:mod:`gqa_prune.search`) -> print.

Registered in ``gqa_prune.cli.SUBCOMMANDS``; user errors raise ``GQAPruneError``, which
``gqa_prune.cli.main`` prints as one line (exit status 2).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from gqa_prune.cli import (
    add_allocation_arguments,
    add_compensation_arguments,
    add_layer_importance_arguments,
    add_unit_importance_arguments,
)
from gqa_prune.cli_utils import (
    UserErrorParser,
    add_data_dir_argument,
    add_model_arguments,
    add_perplexity_arguments,
    int_or_none,
)
from gqa_prune.config import RunConfig

SEARCH_JSON = "search.json"
SEARCH_PLOT = "search_distributions.png"
# the plot title's words for each --rank_by
_RANKED = {"ppl": "perplexity", "zeroshot": "zero-shot", "logprob": "right-choice log-probability"}


def build_search_parser() -> argparse.ArgumentParser:
    d = RunConfig(save_ckpt_log_name="gqa_prune_search")
    p = UserErrorParser(
        prog="gqa-prune search",
        description="Search the attention:MLP split of the removed parameters in one process: "
        "layer importance and unit scores once, then prune a copy per split and rank the "
        "splits by perplexity on held-out calibration (validation) text, or by zero-shot "
        "accuracy on the validation files of ARC-Easy, ARC-Challenge and OpenBookQA; never "
        "on test items.",
    )
    add_model_arguments(p, d.base_model, d.device, d.dtype, d.seed)
    p.add_argument(
        "--distributions",
        required=True,
        help="comma-separated attention:MLP splits, e.g. 0:10,1:9,2:8,3:7",
    )
    p.add_argument("--log_root", default=d.log_root, help="folder holding experiment folders")
    p.add_argument(
        "--save_ckpt_log_name",
        default=d.save_ckpt_log_name,
        help=f"outputs go to <log_root>/<name>/ ({SEARCH_JSON}, {SEARCH_PLOT})",
    )
    add_data_dir_argument(p)
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
    add_layer_importance_arguments(g, d)
    add_unit_importance_arguments(g, d)
    g = p.add_argument_group("compensation (repeated per split: it depends on the plan)")
    add_compensation_arguments(g, d)
    g = p.add_argument_group("validation perplexity")
    add_perplexity_arguments(g, d.eval_seq_len, d.eval_max_windows, d.eval_batch_size)
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
        type=int_or_none,
        default=None,
        help="the first N validation items per task (none = all)",
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
        compensation_seq_len=run.compensation_seq_len,
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
