"""Tokenizer metadata of a GGUF file (``tokenizer.ggml.*``), shared by both tokenizer kinds.

llama.cpp rebuilds the tokenizer from the GGUF metadata: one token string and type per
embedding row, plus, for its ``gpt2`` model (byte-level BPE), the merges and a
pre-tokenizer name, or, for its ``llama`` model (SentencePiece-style BPE), one score per
token and whether a space is prepended. Readers: ``gguf_tokenizer`` (byte-level BPE and
dispatch) and ``gguf_spm`` (SentencePiece-style).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import gguf

from gqa_prune.errors import GQAPruneError

TokenizerModel = Literal["gpt2", "llama"]


@dataclass(frozen=True)
class TokenizerMetadata:
    """What llama.cpp needs to rebuild the tokenizer.

    Attributes:
        model: llama.cpp tokenizer model: ``gpt2`` (byte-level BPE) or ``llama`` (SPM).
        tokens: token string of every id ``0 .. vocab_size-1`` (``[PADi]`` for unused ids).
        token_types: ``gguf.TokenType`` value of every id.
        pre: llama.cpp pre-tokenizer name (``default`` when none matched, and for SPM).
        special_ids: ``bos`` / ``eos`` / ``unk`` / ``pad`` -> id (absent when the tokenizer
            has none).
        add_bos / add_eos: the Hugging Face tokenizer adds BOS / EOS when encoding.
        chat_template: Jinja chat template, if the tokenizer has one.
        merges: ``gpt2`` only: BPE merges as ``"left right"``, in rank order.
        scores: ``llama`` only: one score per id; llama.cpp merges the adjacent pair whose
            concatenation is the token with the highest score first.
        add_space_prefix: ``llama`` only: a ``▁`` is prepended to the text.
    """

    model: TokenizerModel
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    pre: str
    special_ids: dict[str, int]
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    merges: tuple[str, ...] = ()
    scores: tuple[float, ...] = ()
    add_space_prefix: bool = False

    def write_to(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(list(self.tokens))
        writer.add_token_types(list(self.token_types))
        if self.model == "gpt2":
            writer.add_token_merges(list(self.merges))
        else:
            writer.add_token_scores(list(self.scores))
            writer.add_add_space_prefix(self.add_space_prefix)
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


@dataclass(frozen=True)
class HFSettings:
    """Special ids, BOS/EOS insertion and chat template of the loaded HF tokenizer."""

    special_ids: dict[str, int]
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def unsupported(folder: Path, what: str) -> GQAPruneError:
    return GQAPruneError(
        f"cannot export the tokenizer of {folder}: {what}; GGUF export supports BPE tokenizers "
        "saved as tokenizer.json, byte-level (Llama-3, SmolLM2, Qwen2/3, GPT-2 style) or "
        "SentencePiece-style with byte fallback (Llama-2, Mistral v0.1-v0.3)"
    )


def load_tokenizer_json(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    except OSError:
        raise unsupported(
            folder,
            "it has no tokenizer.json (load and save the tokenizer with transformers' "
            "AutoTokenizer to write one)",
        ) from None
    except ValueError as exc:
        raise unsupported(folder, f"tokenizer.json is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise unsupported(folder, "tokenizer.json is not a JSON object")
    return data


def flatten(step: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    """The steps of a (possibly nested) ``Sequence`` normalizer/pre-tokenizer, in order."""
    if step is None:
        return []
    if step.get("type") == "Sequence":
        return [s for inner in step.get(key, []) for s in flatten(inner, key)]
    return [step]


def token_table(
    folder: Path,
    id_to_token: dict[int, str],
    types: dict[int, int],
    vocab_size: int,
) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """One token string and type per embedding row; unused ids become ``[PADi]`` (UNUSED).

    Raises:
        GQAPruneError: a token id beyond the embedding rows, or two ids with the same string
            (llama.cpp aborts on a vocabulary whose strings are not unique).
    """
    if id_to_token and max(id_to_token) >= vocab_size:
        raise unsupported(
            folder,
            f"it has token id {max(id_to_token)} but the model has only {vocab_size} embedding "
            "rows",
        )
    tokens = tuple(id_to_token.get(i, f"[PAD{i}]") for i in range(vocab_size))
    token_types = tuple(types.get(i, gguf.TokenType.UNUSED.value) for i in range(vocab_size))
    repeated = [t for t, n in Counter(tokens).items() if n > 1]
    if repeated:
        raise unsupported(
            folder,
            f"{len(repeated)} token string(s) belong to more than one id, e.g. {repeated[0]!r} "
            "(llama.cpp needs each token string once)",
        )
    return tokens, token_types


def hf_tokenizer_settings(folder: Path) -> HFSettings:
    """Special ids, BOS/EOS insertion and chat template, from the loaded HF tokenizer."""
    from transformers import PreTrainedTokenizerFast

    try:  # straight from tokenizer.json: no model config or remote code involved
        tok = PreTrainedTokenizerFast.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise unsupported(folder, f"transformers cannot load it ({exc})") from None
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
    return HFSettings(
        special_ids, add_bos, add_eos, template if isinstance(template, str) else None
    )
