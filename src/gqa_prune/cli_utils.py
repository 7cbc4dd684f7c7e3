"""What every command line of the package shares: one-line usage errors and ``none`` numbers."""

from __future__ import annotations

import argparse
from typing import NoReturn


class UserErrorParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line, exit status 2, no usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_or_none(text: str) -> int | None:
    """``none`` (any case) -> None, else the integer (argparse ``type=``)."""
    return None if text.lower() == "none" else int(text)


def add_model_arguments(
    p: argparse.ArgumentParser, base_model: str, device: str, dtype: str, seed: int
) -> None:
    """``--base_model``, ``--device``, ``--dtype`` and ``--seed`` with the given defaults."""
    p.add_argument(
        "--base_model",
        default=base_model,
        help="HF folder, hub id, .gguf file or built-in name (smollm2-135m)",
    )
    p.add_argument("--device", default=device, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=dtype, choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=seed)
