"""Training data of the recovery: a non-test token stream packed into full sequences.

The text (calibration split by default) is tokenised as one stream and cut into
consecutive, non-overlapping windows of ``seq_len`` tokens; the tail shorter than a
window is dropped. Every token of every window is a real token, so no pad token ever
enters the loss and no attention mask is needed. The windows are shuffled with a seeded
generator before the budget (``num_samples`` / ``max_tokens``) is taken, so a small
budget still samples the whole text.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from gqa_prune.data import load_text, tokenize_text, with_bos
from gqa_prune.errors import GQAPruneError
from gqa_prune.recovery.config import FinetuneConfig


def pack_tokens(
    tokens: torch.Tensor,
    seq_len: int,
    num_sequences: int | None = None,
    seed: int = 0,
    bos_token_id: int | None = None,
) -> torch.Tensor:
    """Cut a 1-D token stream into shuffled, full windows of ``seq_len`` tokens.

    Args:
        tokens: 1-D token ids.
        seq_len: tokens per window.
        num_sequences: keep at most this many windows (after the shuffle); None = all.
        seed: seed of the shuffle.
        bos_token_id: start every window with it, followed by ``seq_len - 1`` stream
            tokens (:func:`gqa_prune.data.bos_prefix`); None = plain windows.

    Returns:
        ``(n, seq_len)`` long tensor, ``n = min(num_sequences, len(tokens) // span)`` with
        ``span = seq_len`` (``seq_len - 1`` with a BOS).

    Raises:
        GQAPruneError: the stream is shorter than one window.
    """
    if tokens.dim() != 1:
        raise GQAPruneError(
            f"pack_tokens needs a 1-D token stream, got shape {tuple(tokens.shape)}"
        )
    span = seq_len - (bos_token_id is not None)
    n_full = tokens.numel() // span
    if n_full == 0:
        raise GQAPruneError(
            f"the fine-tuning text has {tokens.numel()} tokens, fewer than one sequence of "
            f"--finetune_seq_len {seq_len}; use a longer text or a shorter --finetune_seq_len"
        )
    windows = with_bos(tokens[: n_full * span].view(n_full, span), bos_token_id)
    order = torch.randperm(n_full, generator=torch.Generator().manual_seed(seed))
    if num_sequences is not None:
        order = order[:num_sequences]
    return windows[order].clone()


class PackedDataset(Dataset):
    """``{"input_ids", "labels"}`` rows of a packed ``(n, seq_len)`` tensor.

    ``labels`` equals ``input_ids``: the model shifts them (position t predicts t+1).
    """

    def __init__(self, sequences: torch.Tensor) -> None:
        if sequences.dim() != 2 or sequences.shape[0] == 0:
            raise GQAPruneError(
                "need a non-empty (n, seq_len) tensor of sequences, got shape "
                f"{tuple(sequences.shape)}"
            )
        self.sequences = sequences

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.sequences[i]
        return {"input_ids": row, "labels": row}


def finetune_tokens(tokenizer: Any, config: FinetuneConfig) -> torch.Tensor:
    """Token stream of ``config.dataset``'s non-test split (``wikitext2`` if unset)."""
    text = load_text(config.dataset or "wikitext2", "calibration", config.data_dir)
    return tokenize_text(tokenizer, text)


def build_dataset(
    tokens: torch.Tensor, config: FinetuneConfig, bos_token_id: int | None = None
) -> PackedDataset:
    """Packed training set of ``config.num_sequences`` windows (seeded)."""
    return PackedDataset(
        pack_tokens(tokens, config.seq_len, config.num_sequences, config.seed, bos_token_id)
    )
