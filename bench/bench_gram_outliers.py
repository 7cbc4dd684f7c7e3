"""How much of each refit's Gram matrix comes from the first token of the windows.

Usage::

    GQA_PRUNE_DATA_DIR=/work/shared/data python bench/bench_gram_outliers.py --model smollm2-135m

For every decoder layer and each refitted projection (``o_proj``, ``down_proj``) it runs the
dense model over the compensation windows (drawn as the CLI draws them) and prints, for the
inputs ``X`` of that projection (``G = X^T X``):

- ``first``: the share of ``tr G`` that the first position of every window contributes
  (the BOS token where the tokenizer adds one; the attention sink of models without one);
- ``mean/median``: ``mean(diag G) / median(diag G)``; the ridge of the refit is
  ``damp * mean(diag G)``, so this is how far a few large channels raise it above the
  typical channel's energy;
- ``top``: the share of ``tr G`` of the largest channel.

No pruning, one forward over the windows.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import nn

from gqa_prune.data import bos_prefix, compensation_windows, load_text, tokenize_text
from gqa_prune.models.adapters import get_adapter


@dataclass(frozen=True)
class Energy:
    """Input energy of one projection over the calibration windows."""

    layer: int
    name: str
    first: float  # share of tr G from the first position of the windows
    mean_over_median: float  # mean(diag G) / median(diag G)
    top: float  # share of tr G of the largest channel


class _Recorder:
    """Forward pre-hook: per-channel energy of all tokens and of the first position."""

    def __init__(self, linear: nn.Linear) -> None:
        n = linear.in_features
        self.diag = torch.zeros(n, dtype=torch.float64)
        self.first = torch.zeros(n, dtype=torch.float64)
        self.handle = linear.register_forward_pre_hook(self)

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach().double()  # (B, L, n)
        self.diag += x.square().sum((0, 1)).cpu()
        self.first += x[:, 0].square().sum(0).cpu()


@torch.no_grad()
def gram_energy(model: nn.Module, ids: torch.Tensor, batch_size: int = 4) -> list[Energy]:
    """:class:`Energy` of ``o_proj`` and ``down_proj`` of every layer on windows ``ids``."""
    adapter = get_adapter(model)
    recorders: list[tuple[int, str, _Recorder]] = []
    for i, layer in enumerate(adapter.decoder_layers(model)):
        o = adapter.attention_projections(layer)[3]
        down = adapter.mlp_projections(layer)[2]
        recorders += [(i, "o_proj", _Recorder(o)), (i, "down_proj", _Recorder(down))]
    try:
        for batch in ids.split(batch_size):
            model(batch.to(next(model.parameters()).device))
    finally:
        for _, _, rec in recorders:
            rec.handle.remove()
    rows = []
    for i, name, rec in recorders:
        total = float(rec.diag.sum())
        rows.append(
            Energy(
                layer=i,
                name=name,
                first=float(rec.first.sum()) / total if total > 0 else 0.0,
                mean_over_median=float(rec.diag.mean() / rec.diag.median().clamp_min(1e-30)),
                top=float(rec.diag.max()) / total if total > 0 else 0.0,
            )
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="built-in name or local folder")
    p.add_argument("--samples", type=int, default=64, help="compensation windows")
    p.add_argument("--seq_len", type=int, default=128, help="tokens per window")
    p.add_argument("--seed", type=int, default=42, help="the CLI's --seed")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from gqa_prune.models.loading import load_model

    model, tok = load_model(args.model)
    tokens = tokenize_text(tok, load_text("wikitext2", "calibration"))
    ids = compensation_windows(tokens, args.samples, args.seq_len, args.seed, bos_prefix(tok))
    rows = gram_energy(model, ids)
    print(
        f"\n{args.model}: inputs of the refitted projections, {args.samples} x {args.seq_len} "
        f"compensation windows (seed {args.seed}); uniform first-position share "
        f"{1 / args.seq_len:.4f}\n"
    )
    print(
        "| layer | o_proj first | o_proj mean/median | down_proj first | down_proj mean/median "
        "| down_proj top channel |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    by = {(r.layer, r.name): r for r in rows}
    for i in sorted({r.layer for r in rows}):
        o, d = by[(i, "o_proj")], by[(i, "down_proj")]
        print(
            f"| {i} | {o.first:.3f} | {o.mean_over_median:.1f} | {d.first:.3f} | "
            f"{d.mean_over_median:.1f} | {d.top:.3f} |"
        )


if __name__ == "__main__":
    main()
