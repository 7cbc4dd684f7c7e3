"""A forward pre-hook that accumulates the input statistics of one linear projection."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


class InputStats:
    """Running ``sum x``, token count and (optionally) ``X^T X`` of a linear layer's inputs.

    Registered as a forward pre-hook, so it sees exactly what the projection reads (for
    ``o_proj`` the concatenated head outputs, for ``down_proj`` ``act(gate(h)) * up(h)``).
    Accumulates in float32 on the layer's device; one ``(in, in)`` Gram matrix at most.

    Args:
        linear: the projection to observe.
        gram: also accumulate the Gram matrix (needed by ``lstsq``; ``bias`` needs the mean).
        targets: per-call dense outputs ``Y`` of this projection (call ``i`` of the hook pairs
            with ``targets[i]``, same tokens); accumulates ``cross = X^T Y`` (in x out, fp32).
        weights: per-call token weights ``w`` (``(B, L)``, same tokens as the inputs): the
            Gram matrix becomes ``X^T diag(w) X`` (the sum and the cross product stay plain).
    """

    def __init__(
        self,
        linear: nn.Linear,
        gram: bool,
        targets: Sequence[torch.Tensor] | None = None,
        weights: Sequence[torch.Tensor] | None = None,
    ) -> None:
        n_in, device = linear.in_features, linear.weight.device
        self.count = 0
        self.calls = 0
        self.sum = torch.zeros(n_in, dtype=torch.float64, device=device)
        self.gram = torch.zeros(n_in, n_in, dtype=torch.float32, device=device) if gram else None
        self.targets = targets
        self.weights = weights
        self.cross = (
            None
            if targets is None
            else torch.zeros(n_in, linear.out_features, dtype=torch.float32, device=device)
        )
        self._handle = linear.register_forward_pre_hook(self)

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        self.count += x.shape[0]
        self.sum += x.sum(0, dtype=torch.float64)
        if self.gram is not None:
            if self.weights is None:
                self.gram.addmm_(x.T, x)
            else:
                w = self.weights[self.calls].reshape(-1, 1).to(x.device, torch.float32)
                self.gram.addmm_(x.T, x * w)
        if self.cross is not None and self.targets is not None:
            y = self.targets[self.calls]
            self.cross.addmm_(x.T, y.reshape(-1, y.shape[-1]).to(x.device, torch.float32))
        self.calls += 1

    @property
    def mean(self) -> torch.Tensor:
        """Mean input, shape ``(in,)``, float64."""
        return self.sum / max(self.count, 1)

    def remove(self) -> None:
        """Detach the hook (the statistics stay readable)."""
        self._handle.remove()
