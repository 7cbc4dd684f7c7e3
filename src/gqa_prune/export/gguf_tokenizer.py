"""Tokenizer metadata for a GGUF file: a byte-level BPE ``tokenizer.json`` -> ``tokenizer.ggml.*``.

llama.cpp's ``gpt2`` tokenizer model needs the token strings (byte-level encoded, as in
``tokenizer.json``), one type per token, the merges, and the *name* of a pre-tokenizer: the
regular expressions that split text before BPE are built into llama.cpp and chosen by that
name. We derive the name from the pre-tokenizer that ``tokenizer.json`` describes, so that
llama.cpp splits text the way the Hugging Face tokenizer does. Special token ids, whether a
BOS/EOS is added, and the chat template come from the loaded Hugging Face tokenizer.

SentencePiece-style tokenizers (Llama-2, Mistral v0.1-v0.3: ``Metaspace`` + byte fallback)
are not supported: llama.cpp reads them as its ``llama`` tokenizer model with per-token
scores that ``tokenizer.json`` does not hold.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from gqa_prune.errors import GQAPruneError

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


@dataclass(frozen=True)
class TokenizerMetadata:
    """What llama.cpp needs to rebuild the tokenizer.

    Attributes:
        tokens: token string of every id ``0 .. vocab_size-1`` (``[PADi]`` for unused ids).
        token_types: ``gguf.TokenType`` value of every id.
        merges: BPE merges as ``"left right"``, in rank order.
        pre: llama.cpp pre-tokenizer name (``default`` when none matched).
        special_ids: ``bos`` / ``eos`` / ``unk`` / ``pad`` -> id (absent when the tokenizer
            has none).
        add_bos / add_eos: the Hugging Face tokenizer adds BOS / EOS when encoding.
        chat_template: Jinja chat template, if the tokenizer has one.
    """

    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    merges: tuple[str, ...]
    pre: str
    special_ids: dict[str, int]
    add_bos: bool
    add_eos: bool
    chat_template: str | None

    def write_to(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(list(self.tokens))
        writer.add_token_types(list(self.token_types))
        writer.add_token_merges(list(self.merges))
        adders = {
            "bos": writer.add_bos_token_id,
            "eos": writer.add_eos_token_id,
            "unk": writer.add_unk_token_id,
            "pad": writer.add_pad_token_id,
        }
        for kind, token_id in self.special_ids.items():
            adders[kind](token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def _unsupported(folder: Path, what: str) -> GQAPruneError:
    return GQAPruneError(
        f"cannot export the tokenizer of {folder}: {what}; GGUF export supports byte-level BPE "
        "tokenizers saved as tokenizer.json (Llama-3, SmolLM2, Qwen2, GPT-2 style)"
    )


def _pre_steps(pre: dict[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    """The pre-tokenizer as a tuple of (kind, setting) steps, for matching PRE_TOKENIZERS."""
    if pre is None:
        return ()
    if pre.get("type") == "Sequence":
        return tuple(step for p in pre.get("pretokenizers", []) for step in _pre_steps(p))
    kind = pre.get("type")
    if kind == "ByteLevel":
        return (("ByteLevel", bool(pre.get("use_regex", True))),)
    if kind == "Digits":
        return (("Digits", bool(pre.get("individual_digits", False))),)
    if kind == "Split":
        pattern = pre.get("pattern", {})
        return (("Split", pattern.get("Regex", pattern.get("String"))),)
    return ((str(kind), None),)


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
        GQAPruneError: no ``tokenizer.json``, not a byte-level BPE, or more tokens than
            embedding rows.
    """
    folder = Path(folder)
    try:
        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    except OSError:
        raise _unsupported(folder, "it has no tokenizer.json") from None
    except ValueError as exc:
        raise _unsupported(folder, f"tokenizer.json is not valid JSON ({exc})") from None
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise _unsupported(folder, f"its model is {model.get('type')}, not BPE")
    steps = _pre_steps(data.get("pre_tokenizer"))
    if not any(kind == "ByteLevel" for kind, _ in steps):
        raise _unsupported(
            folder,
            "it is not byte-level (no ByteLevel pre-tokenizer; SentencePiece-style tokenizers "
            "such as Llama-2 or Mistral v0.1-v0.3 are not supported)",
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
    if id_to_token and max(id_to_token) >= vocab_size:
        raise _unsupported(
            folder,
            f"it has token id {max(id_to_token)} but the model has only {vocab_size} embedding "
            "rows",
        )
    tokens = tuple(id_to_token.get(i, f"[PAD{i}]") for i in range(vocab_size))
    token_types = tuple(types.get(i, gguf.TokenType.UNUSED.value) for i in range(vocab_size))
    merges = tuple(_merge_text(m) for m in model.get("merges", []))
    if not merges:
        raise _unsupported(folder, "its BPE has no merges (llama.cpp needs at least one)")
    special_ids, add_bos, add_eos, template = _hf_tokenizer_settings(folder)
    return TokenizerMetadata(
        tokens, token_types, merges, pre, special_ids, add_bos, add_eos, template
    )


def _hf_tokenizer_settings(folder: Path) -> tuple[dict[str, int], bool, bool, str | None]:
    """Special ids, BOS/EOS insertion and chat template, from the loaded HF tokenizer."""
    from transformers import PreTrainedTokenizerFast

    try:  # straight from tokenizer.json: no model config or remote code involved
        tok = PreTrainedTokenizerFast.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise _unsupported(folder, f"transformers cannot load it ({exc})") from None
    special_ids = {
        kind: int(token_id)
        for kind in ("bos", "eos", "unk", "pad")
        if (token_id := getattr(tok, f"{kind}_token_id", None)) is not None
    }
    # what the tokenizer really does when encoding, whatever its config flags say
    ids = tok("a", add_special_tokens=True)["input_ids"]
    add_bos = "bos" in special_ids and len(ids) > 0 and ids[0] == special_ids["bos"]
    add_eos = "eos" in special_ids and len(ids) > 0 and ids[-1] == special_ids["eos"]
    template = getattr(tok, "chat_template", None)
    if isinstance(template, dict):  # named templates: keep the default one
        template = template.get("default")
    return special_ids, add_bos, add_eos, template if isinstance(template, str) else None
