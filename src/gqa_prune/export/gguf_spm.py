"""SentencePiece-style BPE tokenizers (Llama-2, Mistral v0.1-v0.3) for llama.cpp's ``llama`` model.

These tokenizers write spaces as ``▁`` (a ``Replace`` normalizer or a ``Metaspace``
pre-tokenizer, usually with a ``▁`` prepended to the text), have ``<0x00>``..``<0xFF>``
byte tokens, and fall back to those bytes for characters without a token
(``byte_fallback: true``).

llama.cpp's SPM tokenizer does not read merges. It starts from the UTF-8 characters of the
text (spaces already ``▁``) and repeatedly joins the adjacent pair whose concatenation is a
token with the **highest score** (leftmost first among equal scores); characters left
without a token become byte tokens. Hugging Face's BPE instead applies the **merge with the
lowest rank**. ``tokenizer.json`` holds no scores, so they are derived from the merges::

    score(token) = -(rank of the first merge that makes the token)

which makes llama.cpp pick the pair Hugging Face merges first. Tokenizers converted from
SentencePiece list every split ``token = left + right`` into two tokens as a merge, ordered
by the piece's SentencePiece score, and then both agree; the export warns when a split is
missing (llama.cpp joins *any* two adjacent tokens that form a token). Checked on Llama-2's
32k vocabulary (llama.cpp's ``models/ggml-vocab-llama-spm.gguf``, its merges rebuilt as
transformers converts it): same ids as the Hugging Face tokenizer on llama.cpp's 46 test
texts and 200,000 characters of WikiText-2, including its whitespace pieces (``▁▁`` ...,
whose tied SentencePiece scores interleave their merges). ``tokenizer.model`` is not read:
the merges in ``tokenizer.json`` are what the Hugging Face tokenizer actually applies.

Tokens no merge makes get score 0 (single characters, bytes and special tokens are never a
joined pair), except longer ones, which get the lowest score.

One difference remains for ``Metaspace`` tokenizers (transformers 5, Mistral v0.3): llama.cpp,
like SentencePiece and Llama-2's ``Prepend`` normalizer, prepends ``▁`` also to text that
starts with a space (and, with ``prepend_scheme: first``, after each special token parsed in
the text), where ``Metaspace`` does not; the export warns.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gguf

from gqa_prune.export.gguf_vocab import (
    TokenizerMetadata,
    flatten,
    hf_tokenizer_settings,
    token_table,
    unsupported,
)

log = logging.getLogger(__name__)

SPACE = "\u2581"  # ▁, SentencePiece's space
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")
T = gguf.TokenType


def is_sentencepiece_style(data: dict[str, Any]) -> bool:
    """A BPE ``tokenizer.json`` with byte fallback and no byte-level pre-tokenizer."""
    model = data.get("model") or {}
    byte_level = any(
        step.get("type") == "ByteLevel"
        for step in flatten(data.get("pre_tokenizer"), "pretokenizers")
    )
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and not byte_level


def _space_handling(folder: Path, data: dict[str, Any]) -> tuple[bool, bool]:
    """(a ``▁`` is prepended, the text is split at each ``▁``), checked against llama.cpp.

    llama.cpp replaces spaces by ``▁`` and optionally prepends one; any other normalizer
    or pre-tokenizer step would tokenize differently.
    """
    prepend = replaces = split = False
    for step in flatten(data.get("normalizer"), "normalizers"):
        kind = step.get("type")
        pattern = (step.get("pattern") or {}).get("String")
        if kind == "Prepend" and step.get("prepend") == SPACE:
            prepend = True
        elif kind == "Replace" and pattern == " " and step.get("content") == SPACE:
            replaces = True
        else:
            raise unsupported(
                folder,
                f"its normalizer step {kind} {step} has no counterpart in llama.cpp's SPM "
                f"tokenizer (which only replaces spaces by {SPACE} and prepends one)",
            )
    for step in flatten(data.get("pre_tokenizer"), "pretokenizers"):
        if step.get("type") != "Metaspace" or step.get("replacement", SPACE) != SPACE:
            raise unsupported(
                folder,
                f"its pre-tokenizer step {step.get('type')} has no counterpart in llama.cpp's "
                f"SPM tokenizer (only Metaspace with {SPACE})",
            )
        replaces = True
        scheme = step.get("prepend_scheme")
        if scheme is None:  # tokenizers < 0.19 wrote add_prefix_space
            scheme = "always" if step.get("add_prefix_space", True) else "never"
        prepend = prepend or scheme != "never"
        split = split or bool(step.get("split", True))
    if not replaces:
        raise unsupported(folder, f"it does not write spaces as {SPACE} (no Replace or Metaspace)")
    if prepend and not any(
        s.get("type") == "Prepend" for s in flatten(data.get("normalizer"), "normalizers")
    ):
        log.warning(
            "tokenizer of %s: llama.cpp prepends %s also to text that starts with a space (as "
            "SentencePiece does), its Metaspace pre-tokenizer does not: such text gets one %s "
            "more in llama.cpp",
            folder,
            SPACE,
            SPACE,
        )
    return prepend, split


def merge_scores(
    vocab: dict[str, int], merges: Sequence[tuple[str, str]]
) -> tuple[dict[int, float], list[str]]:
    """llama.cpp SPM scores from Hugging Face BPE merges, and what llama.cpp would read otherwise.

    Args:
        vocab: token string -> id of the BPE model.
        merges: ``(left, right)`` pairs in rank order.

    Returns:
        ``{id: score}`` for every multi-character token (``-rank`` of its first merge; the
        lowest score for tokens no merge makes), and what in the merge table makes
        llama.cpp tokenize differently (empty when nothing).
    """
    first_rank: dict[str, int] = {}
    for rank, (left, right) in enumerate(merges):
        first_rank.setdefault(left + right, rank)
    pairs = set(merges)
    lowest = -float(len(merges))
    scores: dict[int, float] = {}
    missing: list[str] = []
    for token, token_id in vocab.items():
        if len(token) < 2 or _BYTE_TOKEN.fullmatch(token):
            continue
        scores[token_id] = -float(first_rank[token]) if token in first_rank else lowest
        # llama.cpp joins *any* two adjacent tokens that form a token; HF only listed pairs
        missing.extend(
            f"{token[:i]} {token[i:]}"
            for i in range(1, len(token))
            if token[:i] in vocab and token[i:] in vocab and (token[:i], token[i:]) not in pairs
        )
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} pair(s) of tokens that form a token are not merges "
            f"(e.g. '{missing[0]}')"
        )
    return scores, problems


def _merge_pairs(folder: Path, merges: Sequence[Any]) -> list[tuple[str, str]]:
    pairs = []
    for m in merges:  # "a b" (older tokenizers) or ["a", "b"]
        pair = m.split(" ") if isinstance(m, str) else list(m)
        if len(pair) != 2:
            raise unsupported(folder, f"merge {m!r} is not a pair of tokens")
        pairs.append((pair[0], pair[1]))
    return pairs


def read_spm_tokenizer(folder: Path, data: dict[str, Any], vocab_size: int) -> TokenizerMetadata:
    """Metadata for llama.cpp's ``llama`` (SPM) tokenizer from a SentencePiece-style BPE.

    Raises:
        GQAPruneError: BPE options or normalizer steps llama.cpp's SPM tokenizer does not
            have, missing byte tokens, or more tokens than embedding rows.
    """
    model = data["model"]
    for option in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "ignore_merges"):
        if model.get(option):
            raise unsupported(folder, f"its BPE sets {option}={model[option]!r}")
    prepend, split = _space_handling(folder, data)
    vocab: dict[str, int] = {str(t): int(i) for t, i in model.get("vocab", {}).items()}
    if split and any(SPACE in t[1:] for t in vocab):
        raise unsupported(
            folder,
            f"its Metaspace pre-tokenizer splits the text at each {SPACE} (split: true) but "
            f"tokens such as {SPACE}{SPACE} span such a split; llama.cpp's SPM tokenizer "
            "does not split",
        )
    missing_bytes = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in vocab]
    if missing_bytes:
        raise unsupported(
            folder,
            f"byte fallback needs all 256 byte tokens, {len(missing_bytes)} are missing "
            f"(e.g. {missing_bytes[0]})",
        )
    merges = _merge_pairs(folder, model.get("merges", []))
    if len(merges) >= 2**24:  # scores are float32
        raise unsupported(folder, f"its {len(merges)} merges are too many for float32 scores")
    added = data.get("added_tokens", [])
    added_ids = {int(a["id"]) for a in added}
    scores, problems = merge_scores({t: i for t, i in vocab.items() if i not in added_ids}, merges)
    if problems:
        log.warning(
            "tokenizer of %s: %s; llama.cpp may tokenize some words differently from the "
            "Hugging Face tokenizer",
            folder,
            "; ".join(problems),
        )

    hf = hf_tokenizer_settings(folder)
    id_to_token = {i: t for t, i in vocab.items()}
    types = {i: (T.BYTE if _BYTE_TOKEN.fullmatch(t) else T.NORMAL).value for t, i in vocab.items()}
    if "unk" in hf.special_ids and hf.special_ids["unk"] in id_to_token:
        types[hf.special_ids["unk"]] = T.UNKNOWN.value
    for token in added:
        token_id = int(token["id"])
        if token_id == hf.special_ids.get("unk"):
            continue
        if token.get("special", False):
            id_to_token[token_id], types[token_id] = token["content"], T.CONTROL.value
        else:  # llama.cpp matches these in the raw text, where spaces are still spaces
            id_to_token[token_id] = token["content"].replace(SPACE, " ")
            types[token_id] = T.USER_DEFINED.value
    tokens, token_types = token_table(folder, id_to_token, types, vocab_size)
    all_scores = tuple(scores.get(i, 0.0) for i in range(vocab_size))
    return TokenizerMetadata(
        "llama",
        tokens,
        token_types,
        "default",
        hf.special_ids,
        hf.add_bos,
        hf.add_eos,
        hf.chat_template,
        scores=all_scores,
        add_space_prefix=prepend,
    )
