"""Token-weighted perplexity, checked against a hand computation."""

import math

import pytest
import torch
from torch import nn

from gqa_prune.errors import GQAPruneError
from gqa_prune.evaluation.perplexity import evaluate_perplexity, make_windows

from conftest import tiny_model


class FixedLM(nn.Module):
    """Predicts token t+1 with probability p(next) given by a fixed table, ignoring context."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.logits_table = nn.Parameter(table.log(), requires_grad=False)

    def forward(self, input_ids):
        out = self.logits_table[input_ids]  # (B, T, V): row = distribution of the next token
        return type("Out", (), {"logits": out})()


def test_perplexity_equals_hand_computation():
    # vocab 3; the distribution of the next token depends on the current token only
    table = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
    tokens = torch.tensor([0, 1, 1, 2, 0, 2, 2])  # seq_len 3 -> windows [0 1 1] [2 0 2] [2]
    result = evaluate_perplexity(FixedLM(table), tokens, seq_len=3, batch_size=2, progress=False)
    # windows with >= 2 tokens: [0,1,1] predicts 1|0, 1|1 ; [2,0,2] predicts 0|2, 2|0
    nll = -(math.log(0.25) + math.log(0.8) + math.log(0.2) + math.log(0.25))
    assert result.num_tokens == 4
    assert result.num_windows == 2
    assert result.ppl == pytest.approx(math.exp(nll / 4), rel=1e-6)


def test_short_last_window_is_token_weighted():
    table = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    tokens = torch.tensor([0, 0, 0, 0, 1, 0])  # seq_len 4 -> [0 0 0 0] (3 preds) + [1 0] (1 pred)
    result = evaluate_perplexity(FixedLM(table), tokens, seq_len=4, progress=False)
    nll = -(3 * math.log(0.5) + math.log(0.9))
    assert result.num_tokens == 4
    assert result.ppl == pytest.approx(math.exp(nll / 4), rel=1e-6)
    # the naive mean of per-window mean losses would differ
    naive = math.exp((-math.log(0.5) + -math.log(0.9)) / 2)
    assert abs(result.ppl - naive) > 1e-3


def test_max_windows_and_real_model():
    model = tiny_model("llama4")
    tokens = torch.randint(0, 128, (100,))
    assert len(make_windows(tokens, 16)) == 7
    result = evaluate_perplexity(model, tokens, seq_len=16, max_windows=3, progress=False)
    assert result.num_windows == 3 and result.num_tokens == 45
    assert 1.0 < result.ppl < 1e4


def test_seq_len_beyond_model_maximum_is_refused():
    model = tiny_model("llama4")
    with pytest.raises(GQAPruneError, match="maximum"):
        evaluate_perplexity(model, torch.randint(0, 128, (600,)), seq_len=512, progress=False)
