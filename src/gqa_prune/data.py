"""Text sources (named data sets or local files) and calibration sampling.

Named sources resolve, in order, to a local copy under the data directory (argument
``data_dir`` or the environment variable ``GQA_PRUNE_DATA_DIR``), then to the Hugging Face
hub through ``datasets`` when it is installed and reachable. Evaluation uses the test
split; calibration and fine-tuning use a non-test split, always.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch

from gqa_prune.errors import GQAPruneError

Split = Literal["eval", "calibration"]
DATA_DIR_ENV = "GQA_PRUNE_DATA_DIR"

# name -> split -> file under the data directory
LOCAL_FILES: dict[str, dict[str, str]] = {
    "wikitext2": {"eval": "wikitext-2-raw/wiki.test.raw", "calibration": "wikitext-2/valid.txt"},
    "ptb": {"eval": "ptb/ptb.test.txt", "calibration": "ptb/ptb.valid.txt"},
    "c4": {"eval": "c4/c4-validation.txt", "calibration": "c4/c4-train.txt"},
}
# name -> split -> (dataset id, config, split, text field)
HUB_SOURCES: dict[str, dict[str, tuple[str, str | None, str, str]]] = {
    "wikitext2": {
        "eval": ("Salesforce/wikitext", "wikitext-2-raw-v1", "test", "text"),
        "calibration": ("Salesforce/wikitext", "wikitext-2-raw-v1", "train", "text"),
    },
    "ptb": {
        "eval": ("ptb_text_only", "penn_treebank", "test", "sentence"),
        "calibration": ("ptb_text_only", "penn_treebank", "train", "sentence"),
    },
    "c4": {
        "eval": ("allenai/c4", "en", "validation", "text"),
        "calibration": ("allenai/c4", "en", "train", "text"),
    },
}


def data_dir_setting(data_dir: str | Path | None = None) -> Path | None:
    """The data directory: the argument, else ``$GQA_PRUNE_DATA_DIR``, else None."""
    value = data_dir or os.environ.get(DATA_DIR_ENV)
    return Path(value) if value else None


def load_text(source: str, split: Split, data_dir: str | Path | None = None) -> str:
    """Return the raw text of a source.

    Args:
        source: a data set name (``wikitext2``, ``ptb``, ``c4``) or a path to a text file.
        split: ``eval`` (test split) or ``calibration`` (a non-test split).
        data_dir: folder holding local copies (see ``LOCAL_FILES``).

    Raises:
        GQAPruneError: the file is missing/empty, or no copy of the named set is reachable.
    """
    if source not in LOCAL_FILES:
        path = Path(source)
        if not path.is_file():
            raise GQAPruneError(
                f"data source '{source}' is neither a file nor a known data set "
                f"({', '.join(LOCAL_FILES)}); pass an existing text file"
            )
        return _read_nonempty(path)
    root = data_dir_setting(data_dir)
    if root is not None:
        local = root / LOCAL_FILES[source][split]
        if local.is_file():
            return _read_nonempty(local)
    text = _load_from_hub(source, split)
    if text is None:
        where = (
            f"{root / LOCAL_FILES[source][split]} does not exist"
            if root
            else (f"no data directory is set (--data_dir or ${DATA_DIR_ENV})")
        )
        raise GQAPruneError(
            f"cannot load '{source}' ({split} split): {where} and the Hugging Face hub is not "
            "reachable; set --data_dir to a folder with the files or pass a text file path"
        )
    return text


def _read_nonempty(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    except OSError as exc:
        raise GQAPruneError(f"cannot read data file {path}: {exc.strerror}") from exc
    if not text.strip():
        raise GQAPruneError(f"data file {path} is empty; pass a file with text in it")
    return text


def _load_from_hub(source: str, split: Split) -> str | None:
    try:
        import datasets  # optional dependency
    except ImportError:
        return None
    name, config, hub_split, field = HUB_SOURCES[source][split]
    try:
        ds = datasets.load_dataset(name, config, split=hub_split)
    except Exception:  # any network/hub failure means "not reachable"
        return None
    if source == "c4":
        ds = ds.select(range(min(len(ds), 5000)))
    return "\n\n".join(ds[field])


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` as one long 1-D tensor (no special tokens added)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def sample_calibration(
    tokens: torch.Tensor, num_samples: int, seq_len: int, seed: int
) -> torch.Tensor:
    """Draw ``num_samples`` windows of ``seq_len`` consecutive tokens, seeded.

    Windows are cut from one token stream, so they contain no padding tokens.

    Returns:
        Tensor of shape ``(num_samples, seq_len)``.
    """
    if num_samples <= 0 or seq_len <= 1:
        raise GQAPruneError(
            f"calibration needs samples > 0 and seq_len > 1 (got {num_samples} x {seq_len})"
        )
    if tokens.numel() < seq_len + 1:
        raise GQAPruneError(
            f"calibration text has {tokens.numel()} tokens, fewer than seq_len={seq_len}; "
            "use a longer text or a smaller sequence length"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len, (num_samples,), generator=gen)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])
