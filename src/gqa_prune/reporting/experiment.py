"""The experiment folder ``prune_log/<name>/`` and its logging.

Layout::

    prune_log/<name>/
      description.txt           every setting
      pruning_plan.json         kept KV groups / MLP channels per layer
      summary.json              parameters, rates, per-layer shapes, perplexity, timings
      model/                    reloadable checkpoint (--save_model)
      <timestamp>/training.log  the run's log
      <timestamp>/train.sh      the exact command, re-runnable
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
from pathlib import Path

from gqa_prune.config import RunConfig
from gqa_prune.errors import GQAPruneError
from gqa_prune.io_utils import write_text_atomic

LOGGER_NAME = "gqa_prune"


class ExperimentDir:
    """Paths of one experiment and its per-run log folder."""

    def __init__(self, config: RunConfig) -> None:
        self.root = Path(config.log_root) / config.save_ckpt_log_name
        self.run_dir = self.root / time.strftime("%Y%m%d-%H%M%S")
        self.model_dir = self.root / "model"
        self.config = config

    def check_overwrite(self) -> None:
        """Refuse to replace a saved model without ``overwrite``; check the folder is writable."""
        if self.model_dir.exists() and self.config.save_model and not self.config.overwrite:
            raise GQAPruneError(
                f"experiment '{self.root}' already holds a saved model; pass --overwrite or "
                "choose another --save_ckpt_log_name"
            )
        parent = self.root
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise GQAPruneError(
                f"cannot write the experiment folder {self.root}: {parent} is not a writable "
                "folder; choose another --log_root"
            )

    def prepare(self) -> None:
        """Create the folders and write description.txt and train.sh."""
        self.check_overwrite()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise GQAPruneError(
                f"cannot create the experiment folder {self.root}: {exc.strerror}; choose a "
                "writable location"
            ) from exc
        command = self.config.command or [sys.argv[0], *sys.argv[1:]]
        write_text_atomic(
            self.run_dir / "train.sh", "#!/usr/bin/env bash\n" + shlex.join(command) + "\n"
        )
        (self.run_dir / "train.sh").chmod(0o755)
        lines = [f"{k}: {v}" for k, v in self.config.to_dict().items() if k != "command"]
        write_text_atomic(self.root / "description.txt", "\n".join(lines) + "\n")

    def path(self, name: str) -> Path:
        return self.root / name


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (it may be replaced, e.g. by tests)."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # the stream is always the current sys.stderr
        pass


def setup_logging(log_file: Path | None = None, verbose: bool = True) -> logging.Logger:
    """Log to the console and (optionally) to ``log_file`` through the standard logging module."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    console = _CurrentStderrHandler()
    console.setFormatter(fmt)
    console.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.addHandler(console)
    if log_file is not None:
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)
    logger.propagate = False
    return logger
