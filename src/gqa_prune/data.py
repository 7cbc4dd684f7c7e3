"""Text sources (named data sets or local files) and calibration sampling.

A path to a text file is read as it is. A comma-separated list of sources
(``wikitext2,books.txt``) reads each and joins them, separated by a blank line, so calibration
windows come from every source in proportion to its length. A named source (``wikitext2``,
``ptb``, ``c4``) resolves, first match wins, to:

1. the local copy under the data directory (argument ``data_dir``, else the environment
   variable ``GQA_PRUNE_DATA_DIR``) when one is set and holds the file;
2. the copy shipped inside the package (``wikitext2`` only; CC BY-SA 3.0, see
   ``gqa_prune/data_files/README.md``) when no data directory is set;
3. the Hugging Face hub through ``datasets`` when it is installed and reachable.

Evaluation uses the test split; calibration and fine-tuning use a non-test split, always.
"""

from __future__ import annotations

import hashlib
import logging
import lzma
import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch

from gqa_prune.errors import GQAPruneError

log = logging.getLogger("gqa_prune.data")

Split = Literal["eval", "calibration"]
DATA_DIR_ENV = "GQA_PRUNE_DATA_DIR"
PACKAGED_DIR = "data_files"  # folder inside the gqa_prune package

# name -> split -> file under the data directory
LOCAL_FILES: dict[str, dict[str, str]] = {
    "wikitext2": {"eval": "wikitext-2-raw/wiki.test.raw", "calibration": "wikitext-2/valid.txt"},
    "ptb": {"eval": "ptb/ptb.test.txt", "calibration": "ptb/ptb.valid.txt"},
    "c4": {"eval": "c4/c4-validation.txt", "calibration": "c4/c4-train.txt"},
}
# name -> split -> (file under gqa_prune/data_files, SHA-256 of its uncompressed bytes)
PACKAGED_FILES: dict[str, dict[str, tuple[str, str]]] = {
    "wikitext2": {
        "eval": (
            "wikitext-2-raw/wiki.test.raw.xz",
            "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c",
        ),
        "calibration": (
            "wikitext-2/valid.txt.xz",
            "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
        ),
    },
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


def source_list(source: str) -> list[str]:
    """The sources of a comma-separated list (a file whose name has a comma is one source).

    Raises:
        GQAPruneError: the list has an empty entry (``wikitext2,``).
    """
    if "," not in source or Path(source).is_file():
        return [source]
    parts = [part.strip() for part in source.split(",")]
    if not all(parts):
        raise GQAPruneError(
            f"data source list '{source}' has an empty entry; separate names or files by "
            "single commas (e.g. wikitext2,books.txt)"
        )
    return parts


def load_text(source: str, split: Split, data_dir: str | Path | None = None) -> str:
    """Return the raw text of a source or a comma-separated list of them (CRLF read as LF).

    A named source is read from the data directory when one is set and holds the file;
    else, with no data directory set, from the packaged copy (``wikitext2``); else from
    the Hugging Face hub (see the module docstring). The texts of a list are joined in its
    order, separated by a blank line.

    Args:
        source: a data set name (``wikitext2``, ``ptb``, ``c4``), a path to a text file, or
            a comma-separated list of these.
        split: ``eval`` (test split) or ``calibration`` (a non-test split).
        data_dir: folder holding local copies (see ``LOCAL_FILES``); None = the
            ``GQA_PRUNE_DATA_DIR`` environment variable, if set.

    Raises:
        GQAPruneError: the file is missing/empty, or no copy of the named set is reachable.
    """
    parts = source_list(source)
    if len(parts) > 1:
        return "\n\n".join(_load_one(part, split, data_dir) for part in parts)
    return _load_one(source, split, data_dir)


def _load_one(source: str, split: Split, data_dir: str | Path | None) -> str:
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
    elif source in PACKAGED_FILES:
        return read_packaged(source, split)
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
            + (
                ", or unset the data directory for the packaged copy"
                if root and source in PACKAGED_FILES
                else ""
            )
        )
    return text


def read_packaged(source: str, split: Split) -> str:
    """The copy of ``source`` shipped in the package, checked against its SHA-256.

    Decoded and normalised exactly like a local file (UTF-8, CRLF -> LF).

    Raises:
        GQAPruneError: no copy of that source ships, or the shipped file is damaged.
    """
    if source not in PACKAGED_FILES:
        raise GQAPruneError(
            f"no packaged copy of '{source}'; packaged: {', '.join(PACKAGED_FILES)}"
        )
    name, sha256 = PACKAGED_FILES[source][split]
    file = resources.files("gqa_prune").joinpath(PACKAGED_DIR, *name.split("/"))
    try:
        raw = lzma.decompress(file.read_bytes())
    except (OSError, lzma.LZMAError) as exc:
        raise GQAPruneError(
            f"the packaged {source} {split} file {name} cannot be read ({exc}); reinstall "
            f"gqa-prune or set --data_dir"
        ) from exc
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise GQAPruneError(
            f"the packaged {source} {split} file {name} does not match its SHA-256; reinstall "
            "gqa-prune or set --data_dir"
        )
    log.info("%s (%s split): packaged copy %s", source, split, name)
    return _normalise(raw.decode("utf-8", errors="replace"))


def _normalise(text: str) -> str:
    return text.replace("\r\n", "\n")


def _read_nonempty(path: Path) -> str:
    try:
        text = _normalise(path.read_text(encoding="utf-8", errors="replace"))
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


def bos_prefix(tokenizer: Any) -> int | None:
    """The BOS id when ``tokenizer`` puts one in front of every text it encodes, else None.

    Windows cut from the middle of a token stream then start with that BOS, as the model
    sees text in use (Gemma's outputs degrade badly without it: dense Gemma-3-270M measured
    332.9 perplexity on 8 WikiText-2 windows without, 39.2 with). Tokenizers that add no
    BOS (SmolLM2, Qwen) keep plain windows.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    try:
        ids = tokenizer("a", add_special_tokens=True, return_attention_mask=False)["input_ids"]
    except (TypeError, ValueError, KeyError):
        return None
    return int(bos) if len(ids) > 0 and int(ids[0]) == int(bos) else None


def with_bos(windows: torch.Tensor, bos_token_id: int | None) -> torch.Tensor:
    """``(n, L)`` windows with ``bos_token_id`` put in front (``(n, L + 1)``); None = as is."""
    if bos_token_id is None:
        return windows
    bos = torch.full((windows.shape[0], 1), bos_token_id, dtype=windows.dtype)
    return torch.cat([bos, windows], dim=1)


def sample_calibration(
    tokens: torch.Tensor,
    num_samples: int,
    seq_len: int,
    seed: int,
    bos_token_id: int | None = None,
) -> torch.Tensor:
    """Draw ``num_samples`` windows of ``seq_len`` consecutive tokens, seeded.

    Windows are cut from one token stream, so they contain no padding tokens. With
    ``bos_token_id`` (see :func:`bos_prefix`) each window is that BOS followed by
    ``seq_len - 1`` stream tokens.

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
    span = seq_len - (bos_token_id is not None)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len, (num_samples,), generator=gen)
    return with_bos(torch.stack([tokens[s : s + span] for s in starts.tolist()]), bos_token_id)


def compensation_windows(
    tokens: torch.Tensor,
    num_samples: int,
    seq_len: int,
    seed: int,
    bos_token_id: int | None = None,
) -> torch.Tensor:
    """The refit's calibration windows: :func:`sample_calibration` at ``seed + 2`` (the unit
    scores draw at ``seed``, the layer analysis at ``seed + 1``), the same draw for every
    entry point (CLI, split search, benchmarks)."""
    return sample_calibration(tokens, num_samples, seq_len, seed + 2, bos_token_id)
