"""Sub-command ``gqa-prune export-gguf PRUNED_DIR OUT.gguf``: parse -> export_gguf -> print.

Registered in ``gqa_prune.cli.SUBCOMMANDS``; user errors raise ``GQAPruneError``, which
``gqa_prune.cli.main`` prints as one line (exit status 2).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from gqa_prune.cli_utils import UserErrorParser
from gqa_prune.export.gguf_export import OUTTYPES, export_gguf


def build_parser() -> argparse.ArgumentParser:
    p = UserErrorParser(
        prog="gqa-prune export-gguf",
        description="Write a pruned (or dense Llama/Mistral/Qwen2/Qwen3) checkpoint folder as a "
        "GGUF file for llama.cpp, with per-layer Q heads, KV heads and MLP widths (architecture "
        "'deci'; 'openelm' for Qwen3), plus the tokenizer (byte-level or SentencePiece-style "
        "BPE).",
    )
    p.add_argument("checkpoint", help="folder written by save_pruned / --save_model")
    p.add_argument("out", help="GGUF file to write")
    p.add_argument(
        "--outtype",
        default="f16",
        choices=OUTTYPES,
        help="type of the weight matrices (norms and biases stay f32); q8_0 keeps matrices "
        "whose rows are not a multiple of 32 in f16",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return p


def export_gguf_main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    logging.basicConfig(level=logging.WARNING, format="gqa-prune: %(message)s")
    path = export_gguf(args.checkpoint, args.out, args.outtype, overwrite=args.overwrite)
    size = path.stat().st_size
    print(f"wrote {path} ({size / 2**20:.1f} MiB, {args.outtype})")
    return 0
