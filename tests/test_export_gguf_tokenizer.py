"""GGUF export of tokenizers: byte-level BPE and SentencePiece-style (Llama-2/Mistral) metadata."""

from __future__ import annotations

import gguf
import pytest
from gguf_helpers import (
    SPM_CHARS,
    SPM_WORDS,
    VOCAB,
    pruned_dir_at,
    pruned_model,
    read,
    spm_merges,
    spm_tokenizer,
)

from gqa_prune import export_gguf, save_pruned
from gqa_prune.export.gguf_spm import merge_scores


@pytest.fixture
def pruned_dir(tmp_path):
    return pruned_dir_at(tmp_path)


def test_tokenizer_metadata(pruned_dir, tmp_path):
    fields, _ = read(export_gguf(pruned_dir, tmp_path / "m.gguf", "f16"))
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "gpt-2"
    assert len(tokens) == len(types) == VOCAB  # one per embedding row
    assert tokens[1] == "<s>" and types[1] == gguf.TokenType.CONTROL
    assert tokens[3] == "!" and types[3] == gguf.TokenType.NORMAL
    assert tokens[VOCAB - 1] == f"[PAD{VOCAB - 1}]" and types[-1] == gguf.TokenType.UNUSED
    assert fields["tokenizer.ggml.merges"] == ["Ġ t", "h e", "Ġt he"]
    assert fields["tokenizer.ggml.bos_token_id"] == 1
    assert fields["tokenizer.ggml.eos_token_id"] == 2
    assert fields["tokenizer.ggml.add_bos_token"] is False


@pytest.mark.parametrize("scheme", ["legacy", "first", "never"])
def test_sentencepiece_tokenizer_metadata(tmp_path, scheme, caplog):
    folder = save_pruned(pruned_model(), spm_tokenizer(scheme), tmp_path / "spm")
    fields, _ = read(export_gguf(folder, tmp_path / "m.gguf", "f16"))
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    scores = fields["tokenizer.ggml.scores"]
    assert fields["tokenizer.ggml.model"] == "llama"  # llama.cpp's SPM tokenizer
    assert fields["tokenizer.ggml.pre"] == "default"
    assert "tokenizer.ggml.merges" not in fields
    assert len(tokens) == len(types) == len(scores) == VOCAB
    assert fields["tokenizer.ggml.add_space_prefix"] is (scheme != "never")
    assert fields["tokenizer.ggml.add_bos_token"] is True
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.unknown_token_id"]) == (
        1,
        0,
    )
    TT = gguf.TokenType
    assert types[:3] == [TT.UNKNOWN, TT.CONTROL, TT.CONTROL]
    assert tokens[3 + 0x41] == "<0x41>" and set(types[3:259]) == {TT.BYTE}
    assert set(types[259 : 259 + len(SPM_CHARS + SPM_WORDS)]) == {TT.NORMAL}
    assert types[-1] == TT.UNUSED
    # score = -(rank of the first merge making the token): llama.cpp joins the pair whose
    # token scores highest, which is the pair Hugging Face merges first
    merges = spm_merges({t: i for i, t in enumerate(SPM_CHARS + SPM_WORDS)})
    first_rank = {}
    for rank, (a, b) in enumerate(merges):
        first_rank.setdefault(a + b, rank)
    by_rank = sorted(first_rank, key=first_rank.get)
    assert [scores[tokens.index(t)] for t in by_rank] == [-float(first_rank[t]) for t in by_rank]
    assert first_rank["ng"] < first_rank["in"]  # "ing" -> "i ng", as in Hugging Face
    assert scores[tokens.index("e")] == scores[tokens.index("<0x41>")] == 0.0
    # Metaspace does not prepend ▁ to text that starts with a space; llama.cpp does
    assert ("starts with a space" in caplog.text) is (scheme == "first")


def test_merge_scores_flags_merge_tables_llama_cpp_would_read_differently():
    vocab = {t: i for i, t in enumerate(["a", "b", "c", "ab", "bc", "abc"])}
    _, problems = merge_scores(vocab, [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")])
    assert problems == []
    # llama.cpp joins "a"+"bc" whenever both are tokens; this table never does
    _, problems = merge_scores(vocab, [("b", "c"), ("a", "b"), ("ab", "c")])
    assert problems and "'a bc'" in problems[0]
