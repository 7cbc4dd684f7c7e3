"""Token-weighted perplexity over non-overlapping windows.

``ppl = exp(sum of token NLL / number of predicted tokens)``: every predicted token counts
once, so a short last window weighs by its length (not like a full window).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gqa_prune.data import bos_prefix, load_text, tokenize_text
from gqa_prune.errors import GQAPruneError


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity with what it was measured on."""

    ppl: float
    nll_sum: float
    num_tokens: int
    num_windows: int
    seq_len: int
    dataset: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_windows(
    tokens: torch.Tensor,
    seq_len: int,
    max_windows: int | None = None,
    bos_token_id: int | None = None,
) -> list[torch.Tensor]:
    """Cut a 1-D token stream into non-overlapping windows of ``seq_len``.

    A last window shorter than ``seq_len`` is kept if it predicts at least one token. With
    ``bos_token_id`` (:func:`gqa_prune.data.bos_prefix`) every window is that BOS followed by
    ``seq_len - 1`` stream tokens, so each window still predicts ``seq_len - 1`` tokens (all
    of its stream tokens).
    """
    if bos_token_id is None:
        windows = [w for w in tokens.split(seq_len) if w.numel() >= 2]
    else:
        bos = tokens.new_full((1,), bos_token_id)
        windows = [torch.cat([bos, w]) for w in tokens.split(seq_len - 1) if w.numel() >= 1]
    return windows[:max_windows] if max_windows is not None else windows


@torch.no_grad()
def evaluate_perplexity(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    seq_len: int = 128,
    max_windows: int | None = None,
    batch_size: int = 8,
    dataset: str = "",
    progress: bool = True,
    bos_token_id: int | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on a token stream.

    Args:
        model: causal LM returning ``.logits``.
        tokens: 1-D token ids.
        seq_len: window length (128 as in the pruning papers; 2048 also common).
        max_windows: evaluate only the first N windows.
        batch_size: windows per forward pass.
        dataset: name recorded with the result.
        bos_token_id: put this BOS in front of every window (see :func:`make_windows`).

    Raises:
        GQAPruneError: no window to evaluate, or the logits are not finite.
    """
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    batches, num_windows = eval_batches(
        tokens, seq_len, max_windows, batch_size, max_pos, bos_token_id
    )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll_sum, count = 0.0, 0
    for batch in tqdm(batches, desc=f"perplexity {dataset}".strip(), disable=not progress):
        batch = batch.to(device)
        nll, n = next_token_nll_sum(model(input_ids=batch).logits, batch)
        nll_sum += nll
        count += n
    model.train(was_training)
    return PerplexityResult(
        ppl=math.exp(nll_sum / count),
        nll_sum=nll_sum,
        num_tokens=count,
        num_windows=num_windows,
        seq_len=seq_len,
        dataset=dataset,
    )


def eval_batches(
    tokens: torch.Tensor,
    seq_len: int,
    max_windows: int | None,
    batch_size: int,
    max_positions: int | None = None,
    bos_token_id: int | None = None,
) -> tuple[list[torch.Tensor], int]:
    """Windows of ``tokens`` stacked into batches: full windows ``batch_size`` at a time,
    then a short last window alone.

    Returns:
        ``(batches, num_windows)``; each batch has shape ``(b, seq_len)`` (or ``(1, n)``).

    Raises:
        GQAPruneError: ``seq_len`` beyond the model's positions, or no window at all.
    """
    if max_positions is not None and seq_len > max_positions:
        raise GQAPruneError(
            f"eval seq_len {seq_len} exceeds the model's maximum of {max_positions} positions; "
            f"use --eval_seq_len {max_positions} or less"
        )
    windows = make_windows(tokens, seq_len, max_windows, bos_token_id)
    if not windows:
        raise GQAPruneError(f"no evaluation window: the text has only {tokens.numel()} tokens")
    full = [w for w in windows if w.numel() == seq_len]
    rest = [w for w in windows if w.numel() != seq_len]
    batches = [torch.stack(full[i : i + batch_size]) for i in range(0, len(full), batch_size)]
    return batches + [w[None] for w in rest], len(windows)


def next_token_nll_sum(logits: torch.Tensor, batch: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL (fp32) of a batch and the number of predicted tokens.

    Args:
        logits: ``(b, L, vocab)``.
        batch: the token ids, ``(b, L)``; position t predicts token t + 1.

    Raises:
        GQAPruneError: non-finite logits.
    """
    logits = logits[:, :-1].float()
    if not torch.isfinite(logits).all():
        raise GQAPruneError("evaluation: the model produced non-finite logits")
    targets = batch[:, 1:].to(logits.device)
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
    )
    return float(nll), targets.numel()


class PPLMetric:
    """The original research code's interface: ``PPLMetric(model, tokenizer, datasets)``.

    Calling it evaluates each named data set (or text file) and returns
    ``{dataset: PerplexityResult}``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        datasets: list[str] | tuple[str, ...] = ("wikitext2",),
        seq_len: int = 128,
        max_windows: int | None = None,
        batch_size: int = 8,
        data_dir: str | Path | None = None,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.datasets, self.seq_len = list(datasets), seq_len
        self.max_windows, self.batch_size, self.data_dir = max_windows, batch_size, data_dir

    def __call__(self) -> dict[str, PerplexityResult]:
        results = {}
        for name in self.datasets:
            tokens = tokenize_text(self.tokenizer, load_text(name, "eval", self.data_dir))
            results[name] = evaluate_perplexity(
                self.model,
                tokens,
                self.seq_len,
                self.max_windows,
                self.batch_size,
                dataset=name,
                bos_token_id=bos_prefix(self.tokenizer),
            )
        return results
