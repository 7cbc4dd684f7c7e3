"""Builders shared by the GGUF export tests: tiny pruned models, tokenizers, readers."""

from __future__ import annotations

import json

import gguf
import numpy as np
from safetensors.torch import load_file, save_file

from gqa_prune import LayerPlan, PruningPlan, apply_plan_, save_pruned

from conftest import tiny_model

VOCAB = 300
HIDDEN = 64
MLP_KEEP = (64, 96, 50)  # multiples of 32 become q8_0; 50 stays f16


def bpe_tokenizer():
    """A byte-level BPE tokenizer (GPT-2 style) built in memory: 256 bytes + 3 merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


SPACE = "\u2581"
# SentencePiece-style pieces, in priority order (as their ids): single characters first,
# then tokens made by merges; "ng" before "in" so that "ing" -> "i ng" (leftmost: "in g")
SPM_CHARS = [SPACE, *"ethoanigrldws123,."]
SPM_WORDS = ["ng", "in", "he", f"{SPACE}t", f"{SPACE}the", SPACE * 2, "nd", f"{SPACE}a",
             f"{SPACE}and", "or", f"{SPACE}w", f"{SPACE}wor", "ld", f"{SPACE}world", f"{SPACE}s",
             f"{SPACE}i", f"{SPACE}in", "12"]  # fmt: skip


def spm_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Merges as transformers converts a SentencePiece BPE: every split of every piece into
    two pieces, ordered by the piece's id, then by the ids of its parts."""
    merges = []
    for token in sorted(vocab, key=vocab.get):
        splits = [(token[:i], token[i:]) for i in range(1, len(token))]
        found = [(a, b) for a, b in splits if a in vocab and b in vocab]
        merges += sorted(found, key=lambda ab: (vocab[ab[0]], vocab[ab[1]]))
    return merges


def spm_tokenizer(scheme: str = "legacy"):
    """A Llama-2-style tokenizer built in memory: <unk> <s> </s>, 256 byte tokens, a few
    pieces; byte fallback; spaces as ▁ by normalizers (Llama-2's tokenizer.json, "legacy")
    or by a Metaspace pre-tokenizer with the given prepend_scheme (transformers 5)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    pieces = {t: len(vocab) + i for i, t in enumerate(SPM_CHARS + SPM_WORDS)}
    merges = spm_merges(pieces)
    vocab.update(pieces)
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if scheme == "legacy":
        tok.normalizer = normalizers.Sequence(
            [normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(SPACE, prepend_scheme=scheme, split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def pruned_model(kind: str = "llama4", **overrides):
    """A tiny model pruned unevenly: KV groups (1, 2, 1) of 2 or 3, MLP widths MLP_KEEP."""
    model = tiny_model(kind, vocab_size=VOCAB, hidden_size=HIDDEN, **overrides)
    n_kv = model.config.num_key_value_heads
    groups = ((0,), tuple(range(n_kv)), (n_kv - 1,))
    plan = PruningPlan(
        layers=tuple(LayerPlan(i, groups[i], tuple(range(96 - MLP_KEEP[i], 96))) for i in range(3)),
        queries_per_kv=model.config.num_attention_heads // n_kv,
        head_dim=model.config.head_dim,
    )
    apply_plan_(model, plan)
    return model


def pruned_dir_at(tmp_path):
    return save_pruned(pruned_model(), bpe_tokenizer(), tmp_path / "pruned")


def read(path):
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


def values(t) -> np.ndarray:
    """A tensor of the file as float32 in PyTorch (rows, cols) order."""
    if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return np.asarray(t.data, dtype=np.float32)
    return gguf.quants.dequantize(t.data, t.tensor_type)


def _edit_checkpoint(folder, drop: list[str], **config_updates) -> None:
    """Remove tensors (by name prefix) and change config.json entries of a checkpoint."""
    weights = load_file(folder / "model.safetensors")
    kept = {k: v for k, v in weights.items() if not any(k.startswith(p) for p in drop)}
    save_file(kept, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    for key, update in config_updates.items():
        cfg[key] = update(cfg[key]) if callable(update) else update
    (folder / "config.json").write_text(json.dumps(cfg))


def _set(index: int, value: int):
    return lambda lst: [value if i == index else v for i, v in enumerate(lst)]
