"""Tokenizer metadata for a GGUF file: ``tokenizer.json`` -> ``tokenizer.ggml.*``.

Two kinds of BPE tokenizer are exported, each to the llama.cpp tokenizer model that
tokenizes text the way the Hugging Face tokenizer does:

* **Byte-level BPE** (Llama-3, SmolLM2, Qwen2/3, GPT-2) -> llama.cpp's ``gpt2`` model. It
  needs the token strings (byte-level encoded, as in ``tokenizer.json``), one type per
  token, the merges, and the *name* of a pre-tokenizer: the regular expressions that split
  text before BPE are built into llama.cpp and chosen by that name. We derive the name from
  the pre-tokenizer that ``tokenizer.json`` describes.
* **SentencePiece-style BPE** (Llama-2, Mistral v0.1-v0.3: byte fallback, spaces as ``▁``)
  -> llama.cpp's ``llama`` (SPM) model, with per-token scores derived from the merges
  (see ``gguf_spm``).

Special token ids, whether a BOS/EOS is added, and the chat template come from the loaded
Hugging Face tokenizer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import gguf

from gqa_prune.export.gguf_spm import is_sentencepiece_style, read_spm_tokenizer
from gqa_prune.export.gguf_vocab import (
    TokenizerMetadata,
    flatten,
    hf_tokenizer_settings,
    load_tokenizer_json,
    token_table,
    unsupported,
)

log = logging.getLogger(__name__)

# Split regexes of the pre-tokenizers llama.cpp knows by name (as written in tokenizer.json).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")

# pre-tokenizer steps (see _pre_steps) -> llama.cpp pre-tokenizer name
PRE_TOKENIZERS: dict[tuple[tuple[str, Any], ...], str] = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("Split", _LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",
    (("Split", _QWEN2_SPLIT), ("ByteLevel", False)): "qwen2",
}


def _pre_steps(pre: dict[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    """The pre-tokenizer as a tuple of (kind, setting) steps, for matching PRE_TOKENIZERS."""
    steps: list[tuple[str, Any]] = []
    for step in flatten(pre, "pretokenizers"):
        kind = step.get("type")
        if kind == "ByteLevel":
            steps.append(("ByteLevel", bool(step.get("use_regex", True))))
        elif kind == "Digits":
            steps.append(("Digits", bool(step.get("individual_digits", False))))
        elif kind == "Split":
            pattern = step.get("pattern", {})
            steps.append(("Split", pattern.get("Regex", pattern.get("String"))))
        else:
            steps.append((str(kind), None))
    return tuple(steps)


def _merge_text(merge: Any) -> str:
    # tokenizers writes merges as "a b" (older) or ["a", "b"] (newer)
    return merge if isinstance(merge, str) else " ".join(merge)


def read_tokenizer(folder: str | Path, vocab_size: int) -> TokenizerMetadata:
    """Read the tokenizer of a model folder for a GGUF file.

    Args:
        folder: model folder with ``tokenizer.json`` (and ``tokenizer_config.json``).
        vocab_size: rows of the embedding matrix; ids the tokenizer does not use up to
            this size become ``[PADi]`` tokens of type UNUSED, as llama.cpp expects one
            token per row.

    Raises:
        GQAPruneError: no ``tokenizer.json``, neither byte-level nor SentencePiece-style
            BPE, or more tokens than embedding rows.
    """
    folder = Path(folder)
    data = load_tokenizer_json(folder)
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise unsupported(folder, f"its model is {model.get('type')}, not BPE")
    if is_sentencepiece_style(data):
        return read_spm_tokenizer(folder, data, vocab_size)
    steps = _pre_steps(data.get("pre_tokenizer"))
    if not any(kind == "ByteLevel" for kind, _ in steps):
        raise unsupported(
            folder,
            "it is not byte-level (no ByteLevel pre-tokenizer) and has no byte fallback "
            "(SentencePiece-style tokenizers need byte_fallback: true)",
        )
    pre = PRE_TOKENIZERS.get(steps)
    if pre is None:
        log.warning(
            "pre-tokenizer %s of %s matches none llama.cpp knows here; writing 'default' "
            "(llama.cpp may split some text differently from the Hugging Face tokenizer)",
            steps,
            folder,
        )
        pre = "default"

    id_to_token: dict[int, str] = {int(i): t for t, i in model.get("vocab", {}).items()}
    types = dict.fromkeys(id_to_token, gguf.TokenType.NORMAL.value)
    for added in data.get("added_tokens", []):
        token_id = int(added["id"])
        id_to_token[token_id] = added["content"]
        special = added.get("special", False)
        types[token_id] = (gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED).value
    tokens, token_types = token_table(folder, id_to_token, types, vocab_size)
    merges = tuple(_merge_text(m) for m in model.get("merges", []))
    if not merges:
        raise unsupported(folder, "its BPE has no merges (llama.cpp needs at least one)")
    hf = hf_tokenizer_settings(folder)
    return TokenizerMetadata(
        "gpt2",
        tokens,
        token_types,
        pre,
        hf.special_ids,
        hf.add_bos,
        hf.add_eos,
        hf.chat_template,
        merges=merges,
    )
