"""Lazy, name-based access to the safetensors weights of a Hugging Face model folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from gqa_prune.errors import GQAPruneError

# tensors that carry no weights llama.cpp needs (recomputed, or norms of removed blocks)
_SKIPPABLE = re.compile(
    r"(.*rotary_emb\.inv_freq|model\.layers\.\d+\.(input|post_attention)_layernorm\.weight)$"
)


class CheckpointWeights:
    """Shapes of every tensor up front; the data of one tensor at a time.

    Args:
        folder: holds ``model.safetensors`` or ``model.safetensors.index.json`` + shards.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.folder / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise GQAPruneError(
                f"{self.folder} has no model.safetensors (or index); GGUF export reads "
                "safetensors weights: save the model with save_pretrained / save_pruned"
            )
        self._file: dict[str, Path] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        for name in files:
            path = self.folder / name
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    self._file[key] = path
                    self._shape[key] = tuple(int(n) for n in f.get_slice(key).get_shape())

    @staticmethod
    def layer(i: int) -> str:
        """Name prefix of decoder layer ``i``."""
        return f"model.layers.{i}"

    def names(self) -> list[str]:
        """Every tensor name of the checkpoint, sorted."""
        return sorted(self._shape)

    def has(self, key: str) -> bool:
        return key in self._shape

    def shape(self, key: str) -> tuple[int, ...] | None:
        """Shape of ``key`` (PyTorch order), None if the checkpoint has no such tensor."""
        return self._shape.get(key)

    def get(self, key: str) -> torch.Tensor:
        with safe_open(self._file[key], framework="pt") as f:
            return f.get_tensor(key)

    def check_all_used(self, used: set[str], arch: str) -> None:
        """Refuse tensors the export would silently drop (e.g. q_norm outside Qwen3)."""
        left = sorted(k for k in self._shape if k not in used and not _SKIPPABLE.match(k))
        if left:
            hint = (
                " (per-head q/k norms are exported for Qwen3 only, as openelm)"
                if any("q_norm" in k or "k_norm" in k for k in left)
                else ""
            )
            raise GQAPruneError(
                f"{len(left)} tensor(s) of {self.folder} have no place in a {arch} GGUF file, "
                f"e.g. '{left[0]}'{hint}; only Llama-style blocks (q/k/v/o, gate/up/down, "
                "RMSNorm) can be exported"
            )
