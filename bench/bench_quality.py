"""Quality per compute: model x target x method -> zero-shot, perplexity, prune time.

Every row prunes a fresh copy of the dense model the way ``gqa-prune`` does (layer
importance, allocation, unit scores where the method needs them, selection, compensation;
load and evaluation excluded) and prints:

- the zero-shot mean (acc_norm; acc for BoolQ and WinoGrande) over the standard tasks, on the
  first ``--zeroshot_limit`` items of each;
- WikiText-2 perplexity on the first ``--eval_windows`` windows of ``--eval_seq_len``
  tokens (128; longer ones ask whether a setting's perplexity holds at longer context);
- prune seconds, and their ratio to ONE forward+backward pass over 32 x 128 calibration
  tokens (batch 4) measured in the same process: LLM-Pruner's cost. CPU seconds are noisy on
  a shared machine; the ratio is the figure to quote.

Two splits, never mixed:

- ``--split validation`` chooses defaults: calibration windows come from the first 90% of
  WikiText-2 valid, perplexity from its last 10%, zero-shot from the validation files of
  ARC-Easy, ARC-Challenge and OpenBookQA;
- ``--split test`` reports: calibration from all of WikiText-2 valid, perplexity on the
  WikiText-2 test split, zero-shot on the test items of all six tasks.

Methods (``--methods``, comma-separated) are named presets of run settings, see ``METHODS``,
each optionally followed by ``@KEY=VALUE`` overrides (``repair-local-bi@alpha=1``);
``default`` is whatever ``RunConfig()`` holds today, ``v0`` the defaults before issue 15.
``@finetune=true`` (with any ``finetune_*`` setting, e.g. ``@finetune_method=distill``)
recovers the pruned model as ``gqa-prune --finetune`` does, on the same calibration tokens
(never the evaluation split), before it is evaluated; the time column then counts pruning
plus recovery.

    GQA_PRUNE_DATA_DIR=../shared/data python bench/bench_quality.py --split test \\
        --targets smollm2-135m:total:0.25,smollm2-135m:total:0.5,gemma3-270m:non_embedding:0.25 \\
        --methods v0,default --zeroshot_limit 100 --eval_windows 200
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import typing
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from zeroshot_column import ZeroShotColumn

from gqa_prune.analysis import compute_layer_importance
from gqa_prune.config import PRESETS, RunConfig, preset_settings
from gqa_prune.data import (
    bos_prefix,
    compensation_windows,
    load_text,
    sample_calibration,
    source_list,
    tokenize_text,
)
from gqa_prune.evaluation.perplexity import evaluate_perplexity
from gqa_prune.evaluation.tasks import SUITE
from gqa_prune.evaluation.zeroshot import format_zeroshot_table
from gqa_prune.io_utils import write_json_atomic
from gqa_prune.models.adapters import get_adapter
from gqa_prune.models.loading import load_model
from gqa_prune.pipeline import prune_model_
from gqa_prune.recovery import FinetuneConfig, finetune_
from gqa_prune.runner import allocation_config
from gqa_prune.search import split_validation

# name -> RunConfig overrides (on top of today's defaults); the library's presets first
# (gqa-prune --preset NAME: "default" is RunConfig() as it is, "knowledge" is S)
METHODS: dict[str, dict[str, Any]] = {
    **{name: preset_settings(name) for name in PRESETS},
    # the defaults before issue 15: removal layer importance, Taylor scores, local targets
    "v0": dict(
        layer_importance_method="removal",
        layer_importance_samples=8,
        selection="score",
        compensation_target="local",
        compensation_samples=64,
    ),
    "none": dict(  # v0 without repair
        layer_importance_method="removal", selection="score", compensation="none"
    ),
}
# measured sensitivity: the repair's error curves + a global solve (no layer importance)
METHODS["sensitivity"] = dict(pruning_mode="sensitivity", pruning_distribution="auto")
# the same, each token's error priced by the squared loss gradient at the layer's output
METHODS["sensitivity-grad"] = dict(METHODS["sensitivity"], sensitivity_weights="gradient")
for _li, _tag in (("removal", "rm"), ("block_influence", "bi")):
    for _sel in ("score", "repair"):
        for _target in ("local", "dense"):
            METHODS[f"{_sel}-{_target}-{_tag}"] = dict(
                layer_importance_method=_li, selection=_sel, compensation_target=_target
            )


def parse_settings(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings -> RunConfig overrides, typed like the field's default."""
    out: dict[str, Any] = {}
    defaults = RunConfig()
    hints = typing.get_type_hints(RunConfig)
    for item in items:
        key, _, value = item.partition("=")
        if not hasattr(defaults, key):
            raise SystemExit(f"unknown RunConfig setting '{key}'")
        out[key] = _typed(hints[key], getattr(defaults, key), value)
    return out


BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _typed(hint: Any, default: Any, value: str) -> Any:
    """``value`` converted like the field: its default's type, else the first of ``int``,
    ``float`` in its annotation (``int | None`` fields such as ``layer_start``); ``none``
    gives None for an optional field; a bool takes true/false, 1/0 or yes/no (``bool("0")``
    would be True)."""
    if isinstance(default, bool):
        word = value.lower()
        if word not in BOOL_WORDS:
            raise SystemExit(f"'{value}' is not a boolean: use true or false")
        return BOOL_WORDS[word]
    if default is not None:
        return type(default)(value)
    args = typing.get_args(hint)
    if value.lower() == "none" and type(None) in args:
        return None
    for kind in (int, float):
        if kind in args:
            return kind(value)
    return value


def method_settings(spec: str) -> dict[str, Any]:
    """``preset[@KEY=VALUE...]`` -> RunConfig overrides (e.g. ``default@alpha=1``)."""
    name, *overrides = spec.split("@")
    if name not in METHODS:
        raise SystemExit(f"unknown method '{name}'; choose from {', '.join(METHODS)}")
    return {**METHODS[name], **parse_settings(overrides)}


def with_seeds(methods: list[str], seeds: list[int]) -> list[str]:
    """Each method once per calibration seed (``m@seed=s``); no seeds = the methods as given.

    The seed draws every calibration window (unit scores, layer analysis, refit), so the rows
    of one method differ only in which WikiText windows it saw.
    """
    if not seeds:
        return methods
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds {','.join(map(str, seeds))}: a seed is named twice")
    for m in methods:
        if "seed" in method_settings(m):
            raise SystemExit(f"method '{m}' sets its own seed; drop @seed=... or --seeds")
    return [f"{m}@seed={s}" for m in methods for s in seeds]


def seed_spread(
    values: dict[str, list[tuple[float | None, float]]],
) -> list[tuple[str, int, str, str]]:
    """``(method, seeds, zero-shot mean (sd), perplexity mean (sd))`` over each method's seeds.

    ``values`` maps a method (without its seed) to one ``(zero-shot mean or None, perplexity)``
    per seed; the sd is the sample standard deviation (n - 1), blank for one seed.
    """

    def spread(xs: list[float], digits: int) -> str:
        text = f"{statistics.mean(xs):.{digits}f}"
        return text if len(xs) < 2 else f"{text} ({statistics.stdev(xs):.{digits}f})"

    out = []
    for method, rows in values.items():
        scores = [z for z, _ in rows if z is not None]
        zs = spread(scores, 4) if len(scores) == len(rows) else "-"
        out.append((method, len(rows), zs, spread([p for _, p in rows], 2)))
    return out


def reference_seconds(model: torch.nn.Module, ids: torch.Tensor, batch_size: int) -> float:
    """One forward+backward pass over ``ids`` (the peer's whole cost), in seconds."""
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    for batch in ids.split(batch_size):
        model(input_ids=batch, labels=batch).loss.backward()
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return seconds


def calibration_tokens(
    spec: str, wikitext: torch.Tensor, tokenizer: Any, data_dir: str | None
) -> torch.Tensor:
    """Calibration tokens of ``--calibration_dataset`` (a comma list), joined by a blank line.

    ``wikitext2`` stands for ``wikitext`` (the calibration split, without the validation
    tail when the bench runs on validation); any other source is read whole.
    """
    sep = tokenize_text(tokenizer, "\n\n")
    parts: list[torch.Tensor] = []
    for source in source_list(spec):
        if parts:
            parts.append(sep)
        if source == "wikitext2":
            parts.append(wikitext)
        else:
            parts.append(tokenize_text(tokenizer, load_text(source, "calibration", data_dir)))
    return torch.cat(parts)


def prune_like_the_cli(
    model: torch.nn.Module, c: RunConfig, tokens: torch.Tensor, bos: int | None
) -> None:
    """Layer importance + ``prune_model_`` with the run's windows and seeds (as the runner)."""
    seq = c.taylor_seq_len
    importance = None
    if c.pruning_mode != "sensitivity" or c.freeze_top_n_layers:
        li_ids = sample_calibration(tokens, c.layer_importance_samples, seq, c.seed + 1, bos)
        importance = compute_layer_importance(
            model,
            li_ids,
            c.layer_importance_method,  # type: ignore[arg-type]
            batch_size=c.taylor_batch_size,
            progress=False,
        ).scores
    ids = sample_calibration(tokens, c.channel_importance_samples, seq, c.seed, bos)
    comp_ids = None
    if c.compensation != "none":
        comp_ids = compensation_windows(
            tokens, c.compensation_samples, c.compensation_seq_len, c.seed, bos
        )
    prune_model_(
        model,
        ids,
        allocation_config(c),
        layer_importance=importance,
        criterion=c.importance,
        aggregation=c.aggregation,
        mode=c.pruning_mode,  # type: ignore[arg-type]
        batch_size=c.taylor_batch_size,
        seed=c.seed,
        progress=False,
        compensation=c.compensation,
        compensation_ids=comp_ids,
        compensation_damp=c.compensation_damp,
        selection=c.selection,
        compensation_target=c.compensation_target,
        sensitivity_weights=c.sensitivity_weights,
        compensation_target_norm=c.compensation_target_norm,
    )
    model.zero_grad(set_to_none=True)


def recovery_config(c: RunConfig) -> FinetuneConfig:
    """The row's recovery settings; refused unless they train on the calibration text.

    The recovery text is the calibration text the prune used (the CLI's default for
    ``--finetune_dataset``), so a bench row can never train on an evaluation split.
    """
    ft = c.finetune_config
    if ft.dataset != c.calibration_dataset:
        raise SystemExit(
            f"finetune_dataset={ft.dataset}: the bench recovers on the calibration text only"
        )
    return ft


def recover_like_the_cli(
    model: torch.nn.Module,
    dense: torch.nn.Module,
    tokenizer: Any,
    c: RunConfig,
    tokens: torch.Tensor,
) -> None:
    """``--finetune``: recovery on the calibration tokens (``dense`` is the distill teacher)."""
    ft = recovery_config(c)
    teacher = copy.deepcopy(dense).eval().requires_grad_(False) if ft.method == "distill" else None
    result = finetune_(model, tokenizer, ft, teacher=teacher, tokens=tokens)
    if result.stopped_at_step is not None:
        print(f"recovery stopped: {result.message}", flush=True)
    model.eval()


def items_path(folder: str, target: str, method: str) -> Path:
    """``folder/<target>__<method>.json`` with the characters a file name cannot hold
    replaced (``smollm2-135m:total:0.25`` -> ``smollm2-135m_total_0.25``)."""
    name = f"{target}__{method}".replace(":", "_").replace("/", "_").replace("=", "-")
    return Path(folder) / f"{name}.json"


def base_config(spec: str, extra: dict[str, Any]) -> RunConfig:
    """The run settings of one ``--targets`` entry ``model:basis:ratio`` with ``--set``'s
    overrides (RunConfig refuses an unknown basis or a ratio out of range)."""
    _, basis, ratio = spec.split(":")
    base = RunConfig(pruning_ratio=float(ratio), pruning_ratio_basis=basis, prune_mlp=True)
    return replace(base, **extra)


def build_parser() -> argparse.ArgumentParser:
    """The command line (also read by the test that checks the commands in the docs)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--targets",
        default="smollm2-135m:total:0.25",
        help="comma-separated model:basis:ratio (basis total or non_embedding)",
    )
    p.add_argument("--methods", default="v0,default")
    p.add_argument("--split", choices=["validation", "test"], default="validation")
    p.add_argument("--eval_windows", type=int, default=200, help="perplexity windows")
    p.add_argument(
        "--eval_seq_len",
        type=int,
        default=RunConfig().eval_seq_len,
        help="tokens per perplexity window (as gqa-prune's --eval_seq_len; default 128)",
    )
    p.add_argument("--zeroshot_limit", type=int, default=100, help="items per task (0 = off)")
    p.add_argument("--zeroshot_batch_size", type=int, default=8)
    p.add_argument(
        "--zeroshot_suite",
        default=SUITE,
        help=f"the tasks: {SUITE} (all six on test, the three with a validation split on "
        "validation) or a comma-separated list of their names, e.g. without boolq",
    )
    p.add_argument(
        "--zeroshot_tasks", action="store_true", help="also print each row's per-task table"
    )
    p.add_argument("--validation_fraction", type=float, default=0.1)
    p.add_argument("--set", action="append", default=[], help="extra RunConfig KEY=VALUE")
    p.add_argument(
        "--seeds",
        default="",
        help="comma-separated calibration seeds: every method runs once per seed "
        "(method@seed=S) and a last table gives the mean and sd over the seeds",
    )
    p.add_argument("--no_dense", action="store_true", help="skip the dense rows")
    p.add_argument("--data_dir", default=os.environ.get("GQA_PRUNE_DATA_DIR"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--save_items",
        metavar="DIR",
        help="write each row's zero-shot result with per-item scores to DIR/<target>__<method>"
        ".json, for a paired comparison (bench/compare_items.py)",
    )
    return p


def main() -> None:
    p = build_parser()
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        p.error(f"--seeds {args.seeds}: give integers separated by commas, e.g. 42,43,44")
    names = with_seeds(args.methods.split(","), seeds)
    methods = {m: method_settings(m) for m in names}
    for settings in methods.values():  # refuse a recovery setting before any model loads
        if settings.get("finetune"):
            recovery_config(RunConfig(**settings))
    extra = parse_settings(args.set)
    column = None
    if args.zeroshot_limit:
        column = ZeroShotColumn.create(
            args.zeroshot_limit,
            args.split,
            args.data_dir,
            args.zeroshot_batch_size,
            log_samples=bool(args.save_items),
            tasks=args.zeroshot_suite,
        )
    elif args.save_items:
        p.error("--save_items needs a zero-shot column: set --zeroshot_limit N")
    if args.save_items:
        names = ([] if args.no_dense else ["dense"]) + list(methods)
        targets = args.targets.split(",")
        taken = [
            path
            for t in targets
            for m in names
            if (path := items_path(args.save_items, t, m)).exists()
        ]
        if taken:
            p.error(f"--save_items: {taken[0]} exists; choose another folder or remove it")
    rows: list[tuple[str, ...]] = []
    seed_rows: list[tuple[object, ...]] = []  # (target, method, seeds, zero-shot, perplexity)
    for spec in args.targets.split(","):
        name, basis, ratio = spec.split(":")
        dense, tok = load_model(name, device="cpu")
        dense.eval()
        bos = bos_prefix(tok)
        calib_tokens = tokenize_text(tok, load_text("wikitext2", "calibration", args.data_dir))
        if args.split == "validation":
            calib_tokens, eval_tokens = split_validation(calib_tokens, args.validation_fraction)
        else:
            eval_tokens = tokenize_text(tok, load_text("wikitext2", "eval", args.data_dir))
        base = base_config(spec, extra)
        ref_ids = sample_calibration(calib_tokens, 32, base.taylor_seq_len, 0, bos)
        reference_seconds(dense, ref_ids[:4], base.taylor_batch_size)  # warm-up
        ref = reference_seconds(dense, ref_ids, base.taylor_batch_size)
        target = f"{name} {100 * float(ratio):.0f}% {basis.replace('_', '-')}"

        def evaluate(model: torch.nn.Module, method: str) -> tuple[str, str, float | None, float]:
            """``(zero-shot text, perplexity text, zero-shot mean, perplexity)`` of one row."""
            ppl = evaluate_perplexity(
                model,
                eval_tokens,  # noqa: B023 - evaluated within the iteration
                args.eval_seq_len,
                args.eval_windows,
                progress=False,
                bos_token_id=bos,  # noqa: B023
            ).ppl
            zs, score = "-", None
            if column is not None:
                result = column.evaluate(model, tok)  # noqa: B023
                if args.save_items:
                    path = items_path(args.save_items, spec, method)  # noqa: B023
                    write_json_atomic(path, result.to_dict())
                if args.zeroshot_tasks:
                    print(format_zeroshot_table({"model": result}), flush=True)
                score = result.mean_score
                zs = "n/a" if score is None else f"{score:.4f}"
                if result.mean_logprob is not None:  # log-prob of the right choice
                    zs += f" (logprob {result.mean_logprob:.3f})"
            return zs, f"{ppl:.2f}", score, ppl

        if not args.no_dense:
            params = get_adapter(dense).geometry(dense).total_params
            rows.append(
                (target, "dense", *evaluate(dense, "dense")[:2], "", f"1 fwd+bwd = {ref:.1f} s", "")
            )
            print(rows[-1], flush=True)
        by_seed: dict[str, list[tuple[float | None, float]]] = {}  # method -> one per seed
        for method, settings in methods.items():
            c = replace(base, **settings)
            tokens = calibration_tokens(c.calibration_dataset, calib_tokens, tok, args.data_dir)
            model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            prune_like_the_cli(model, c, tokens, bos)
            if c.finetune:
                recover_like_the_cli(model, dense, tok, c, tokens)
            seconds = time.perf_counter() - t0
            params = get_adapter(model).geometry(model).total_params
            zs_text, ppl_text, score, ppl = evaluate(model, method)
            rows.append(
                (
                    target,
                    method,
                    zs_text,
                    ppl_text,
                    f"{seconds:.1f}",
                    f"{seconds / ref:.2f}x",
                    f"{params:,}",
                )
            )
            print(rows[-1], flush=True)
            by_seed.setdefault(method.rsplit("@seed=", 1)[0], []).append((score, ppl))
            del model
        del dense
        if seeds:
            seed_rows += [(target, *row) for row in seed_spread(by_seed)]

    zs = column.header if column is not None else "zero-shot (off)"
    ppl_where = (
        f"last {args.validation_fraction:.0%} of wikitext-2 valid"
        if args.split == "validation"
        else "wikitext-2 test"
    )
    print(
        f"\nsplit {args.split}: perplexity on the first {args.eval_windows} windows of "
        f"{args.eval_seq_len} tokens of "
        f"{ppl_where}; {zs}; prune time vs one forward+backward over 32 x 128 tokens; "
        f"{torch.get_num_threads()} threads\n"
    )
    print(f"| target | method | {zs} mean | perplexity | prune s | vs fwd+bwd | parameters |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if seeds:
        print(f"\nover the calibration seeds {','.join(map(str, seeds))} (mean, sd in brackets)\n")
        print(f"| target | method | seeds | {zs} mean | perplexity |")
        print("|---|---|---:|---:|---:|")
        for row in seed_rows:
            print("| " + " | ".join(map(str, row)) + " |")


if __name__ == "__main__":
    main()
