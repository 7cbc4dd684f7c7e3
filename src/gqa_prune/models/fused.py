"""Fused projections (Phi-3's ``qkv_proj`` / ``gate_up_proj``) held as separate parts.

A fused projection stacks the rows of projections that read the same input. In Phi-3::

    qkv_proj.weight      rows [0, n_q*d)              q   (query heads, r per KV head)
    (n_q + 2*n_kv)*d     rows [n_q*d, (n_q+n_kv)*d)   k
       x hidden          rows [(n_q+n_kv)*d, ...)     v
    gate_up_proj.weight  rows [0, m) gate, rows [m, 2m) up

:class:`SplitLinear` keeps each row block as its own ``nn.Linear`` child and returns
``cat([part(x) for part in parts], dim=-1)``: for ``W = [W_1; W_2; ...]`` the fused
``x W^T + b`` is exactly the concatenation of the parts' ``x W_i^T + b_i`` (same FLOPs,
one matmul per part). So every gqa-prune step (scoring hooks and gradients, slicing,
compensation, LoRA) sees plain projections and needs no fused-specific code.

Its ``state_dict`` is the fused layout (one ``weight`` / ``bias`` whose rows are the parts,
stacked in order), and a fused ``weight`` / ``bias`` given to ``load_state_dict`` is split at
the parts' current sizes: checkpoints keep the family's own tensor names, and a sliced part
re-fuses to that layer's size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import nn

_KINDS = ("weight", "bias")


class SplitLinear(nn.Module):
    """One fused ``nn.Linear`` as its row blocks (children in stacking order).

    Args:
        parts: name -> ``nn.Linear``, in the order their rows are stacked; all read the
            same input and all or none carry a bias.
    """

    def __init__(self, parts: Mapping[str, nn.Linear]) -> None:
        super().__init__()
        linears = list(parts.values())
        if not linears:
            raise ValueError("SplitLinear needs at least one part")
        if len({p.in_features for p in linears}) != 1:
            raise ValueError(f"parts read different widths: {[p.in_features for p in linears]}")
        if len({p.bias is None for p in linears}) != 1:
            raise ValueError("either every part of a fused projection has a bias or none has")
        for name, part in parts.items():
            self.add_module(name, part)
        # plain functions (not bound methods): a deep copy of the module keeps working
        self.register_state_dict_post_hook(_fuse_state)
        self.register_load_state_dict_pre_hook(_split_state)

    @property
    def parts(self) -> list[nn.Linear]:
        """The row blocks, in stacking order."""
        return cast(list[nn.Linear], list(self.children()))

    @property
    def in_features(self) -> int:
        return self.parts[0].in_features

    @property
    def out_features(self) -> int:
        return sum(p.out_features for p in self.parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in) -> (..., sum of part widths)``, the fused projection's output."""
        return torch.cat([part(x) for part in self.parts], dim=-1)

    @classmethod
    def split(cls, fused: nn.Linear, sizes: Mapping[str, int]) -> SplitLinear:
        """Split ``fused`` into consecutive row blocks named and sized by ``sizes``.

        The parts get copies of the rows (meta tensors stay meta) and the fused weight's
        ``requires_grad``.
        """
        if sum(sizes.values()) != fused.out_features or min(sizes.values()) <= 0:
            raise ValueError(
                f"row blocks {dict(sizes)} do not partition the {fused.out_features} output "
                "rows of the fused projection"
            )
        parts: dict[str, nn.Linear] = {}
        start = 0
        for name, size in sizes.items():
            part = nn.Linear(
                fused.in_features, size, bias=fused.bias is not None, device="meta"
            )  # no random init: every tensor is replaced below
            for kind in _KINDS:
                tensor = getattr(fused, kind)
                if tensor is not None:
                    rows = tensor.data[start : start + size].clone()
                    setattr(part, kind, nn.Parameter(rows, requires_grad=tensor.requires_grad))
            parts[name] = part
            start += size
        return cls(parts)


def _fuse_state(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    """state_dict post-hook: ``prefix.<part>.weight`` ... -> one stacked ``prefix.weight``.

    Left split when a part is not a plain Linear any more (e.g. wrapped by peft LoRA).
    """
    names = list(module._modules)
    for kind in _KINDS:
        keys = [f"{prefix}{name}.{kind}" for name in names]
        if all(k in state_dict for k in keys):
            state_dict[prefix + kind] = torch.cat([state_dict.pop(k) for k in keys], dim=0)


def _split_state(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """load_state_dict pre-hook: a stacked ``prefix.weight`` -> the parts' rows (views)."""
    parts = dict(module.named_children())
    sizes = [int(p.out_features) for p in parts.values()]  # type: ignore[arg-type]
    for kind in _KINDS:
        fused = state_dict.get(prefix + kind)
        if fused is None:
            continue
        if fused.shape[0] != sum(sizes):
            error_msgs.append(
                f"{prefix}{kind} has {fused.shape[0]} rows; the parts {list(parts)} of this "
                f"fused projection have {sizes}"
            )
            continue
        del state_dict[prefix + kind]
        for name, rows in zip(parts, fused.split(sizes, dim=0), strict=True):
            state_dict[f"{prefix}{name}.{kind}"] = rows
