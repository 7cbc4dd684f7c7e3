"""What every command line of the package shares: one-line usage errors, help that shows each
default once, ``none`` numbers, and the flags several commands take."""

from __future__ import annotations

import argparse
import re
from typing import Any, NoReturn

from gqa_prune.models.loading import BUILTIN_MODELS

DTYPES = ("auto", "float32", "bfloat16", "float16")
# a help text that already says what the default is: "(default: ...)", "x (default)", "; default)"
_NAMES_DEFAULT = re.compile(r"\(default\b|\bdefault\)|\bdefault:")


def is_switch(action: argparse.Action) -> bool:
    """A flag that takes no value (``store_true`` and the like): its default is "off"."""
    return bool(action.option_strings) and action.nargs == 0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to a flag's help unless the help already names its default,
    the flag is a switch, or the default is ``None`` (the help says what "unset" means)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if _NAMES_DEFAULT.search(text) or action.default is None or is_switch(action):
            return text
        return super()._get_help_string(action)


class UserErrorParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line, exit status 2, no usage block;
    its help shows every flag's default (:class:`HelpFormatter`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_or_none(text: str) -> int | None:
    """``none`` (any case) -> None, else the integer (argparse ``type=``)."""
    return None if text.lower() == "none" else int(text)


def add_model_arguments(p: Any, base_model: str, device: str, dtype: str, seed: int) -> None:
    """``--base_model``, ``--device``, ``--dtype`` and ``--seed`` with the given defaults
    (``p``: a parser or an argument group)."""
    p.add_argument(
        "--base_model",
        default=base_model,
        help=f"HF folder, hub id, .gguf file or built-in name ({', '.join(BUILTIN_MODELS)})",
    )
    p.add_argument("--device", default=device, help="auto, cpu, cuda or cuda:N")
    add_dtype_seed_arguments(p, dtype, seed)


def add_dtype_seed_arguments(p: Any, dtype: str, seed: int) -> None:
    """``--dtype`` and ``--seed``."""
    p.add_argument(
        "--dtype",
        default=dtype,
        choices=DTYPES,
        help="weights' type in memory; auto = bfloat16 on CUDA, float32 on CPU",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=seed,
        help="seed of every random draw (data windows, their order, sampling)",
    )


def add_data_dir_argument(p: Any) -> None:
    """``--data_dir`` (unset: ``$GQA_PRUNE_DATA_DIR``, else the hub)."""
    p.add_argument(
        "--data_dir",
        default=None,
        help="folder with local data copies (else $GQA_PRUNE_DATA_DIR, else the hub)",
    )


def add_perplexity_arguments(
    p: Any, seq_len: int, max_windows: int | None, batch_size: int | None = None
) -> None:
    """``--eval_seq_len``, ``--eval_max_windows`` and (given a default) ``--eval_batch_size``."""
    p.add_argument(
        "--eval_seq_len",
        type=int,
        default=seq_len,
        help="tokens per perplexity window (non-overlapping; 128 as in the pruning papers)",
    )
    p.add_argument(
        "--eval_max_windows",
        type=int_or_none,
        default=max_windows,
        help="evaluate only the first N windows (none = all)",
    )
    if batch_size is not None:
        p.add_argument(
            "--eval_batch_size", type=int, default=batch_size, help="windows per forward pass"
        )
