"""Windows start with BOS where the tokenizer puts one in front of every text (Gemma)."""

import math

import pytest
import torch
from tokenizers import Tokenizer, models, processors
from transformers import PreTrainedTokenizerFast

from gqa_prune.data import bos_prefix, sample_calibration
from gqa_prune.evaluation.perplexity import evaluate_perplexity, make_windows
from gqa_prune.recovery.data import pack_tokens

from conftest import tiny_model

BOS = 1


def _tokenizer(adds_bos: bool) -> PreTrainedTokenizerFast:
    chars = [chr(i) for i in range(32, 127)]
    vocab = {"<unk>": 0, "<s>": BOS, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", BOS)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@pytest.mark.parametrize("adds_bos", [True, False])
def test_bos_prefix_only_where_the_tokenizer_adds_one(adds_bos):
    assert bos_prefix(_tokenizer(adds_bos)) == (BOS if adds_bos else None)
    assert bos_prefix(None) is None


def test_calibration_windows_are_bos_then_the_same_stream_runs():
    tokens = torch.arange(10, 1010)
    plain = sample_calibration(tokens, 6, 16, seed=3)
    with_bos = sample_calibration(tokens, 6, 16, seed=3, bos_token_id=BOS)
    assert with_bos.shape == plain.shape == (6, 16)
    assert torch.all(with_bos[:, 0] == BOS)
    # same seeded starts; the BOS takes the place of the last stream token
    assert torch.equal(with_bos[:, 1:], plain[:, :-1])


def test_eval_windows_with_bos_predict_every_stream_token_once():
    tokens = torch.arange(10, 110)  # 100 tokens
    windows = make_windows(tokens, 16, bos_token_id=BOS)
    assert all(w[0] == BOS for w in windows)
    assert all(w.numel() == 16 for w in windows[:-1])
    assert torch.equal(torch.cat([w[1:] for w in windows]), tokens)
    plain = make_windows(tokens, 16)
    # without BOS the first token of each window is context only
    assert sum(w.numel() - 1 for w in plain) == 100 - len(plain)


def test_perplexity_with_bos_is_the_nll_of_each_window_after_bos(one_thread):
    model = tiny_model("llama4")
    tokens = torch.randint(3, 128, (40,), generator=torch.Generator().manual_seed(0))
    result = evaluate_perplexity(model, tokens, seq_len=8, bos_token_id=BOS, progress=False)
    assert result.num_tokens == 40
    nll = 0.0
    with torch.no_grad():
        for chunk in tokens.split(7):
            ids = torch.cat([torch.tensor([BOS]), chunk])[None]
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            nll -= logp.gather(1, ids[0, 1:, None]).sum().item()
    assert math.isclose(result.ppl, math.exp(nll / 40), rel_tol=1e-5)
    plain = evaluate_perplexity(model, tokens, seq_len=8, progress=False)
    assert plain.num_tokens == 40 - 5 and plain.ppl != result.ppl


def test_finetune_packs_bos_windows():
    tokens = torch.arange(10, 110)
    packed = pack_tokens(tokens, 11, seed=0, bos_token_id=BOS)
    assert packed.shape == (10, 11) and torch.all(packed[:, 0] == BOS)
    assert sorted(packed[:, 1:].reshape(-1).tolist()) == tokens.tolist()
