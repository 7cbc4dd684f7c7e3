"""The layer importance result: a frozen, JSON-serialisable record, saved and validated."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from torch import nn

from gqa_prune.errors import GQAPruneError
from gqa_prune.io_utils import write_json_atomic
from gqa_prune.models.adapters import ADAPTERS, get_adapter
from gqa_prune.models.geometry import heads_from_config

log = logging.getLogger(__name__)

FILE_NAME = "layer_importance_config.json"
METHODS = ("removal", "activation", "block_influence")
_RERUN = "re-run without --skip_importance_analysis to recompute it"
# model_identity fields that must match the model a saved result is applied to.
STRUCTURAL_FIELDS = (
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
)
IDENTITY_FIELDS = ("name_or_path", "model_type", *STRUCTURAL_FIELDS)


def model_identity(model: nn.Module) -> dict[str, Any]:
    """What a layer importance result was measured on: name and unpruned shapes.

    Returns:
        ``name_or_path``, ``model_type``, ``num_hidden_layers`` (decoder layers actually
        present), ``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``,
        ``intermediate_size``.
    """
    config: Any = model.config
    n_q, n_kv, _ = heads_from_config(config)
    return {
        "name_or_path": str(getattr(config, "name_or_path", "") or ""),
        "model_type": str(getattr(config, "model_type", "")),
        "num_hidden_layers": len(get_adapter(model).decoder_layers(model)),
        "hidden_size": int(config.hidden_size),
        "num_attention_heads": n_q,
        "num_key_value_heads": n_kv,
        "intermediate_size": int(getattr(config, "intermediate_size", 0) or 0),
    }


def _family(model_type: str) -> str:
    adapter = ADAPTERS.get(model_type)
    return adapter.family if adapter is not None else model_type


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class LayerImportance:
    """Importance of every decoder layer; higher = more important.

    Attributes:
        method: ``removal``, ``activation`` or ``block_influence``.
        scores: one finite score per decoder layer, in layer order.
        num_samples: calibration sequences used (N).
        seq_len: tokens per calibration sequence (L).
        model_identity: see :func:`model_identity`.
        num_layers: number of decoder layers (= ``len(scores)``).
        extra: method details; for ``removal``: ``base_loss``, ``base_ppl``,
            ``loss_without_layer``, ``ppl_without_layer`` (lists), ``num_tokens``.
    """

    method: str
    scores: tuple[float, ...]
    num_samples: int
    seq_len: int
    model_identity: dict[str, Any]
    num_layers: int
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problem = _problem(self)
        if problem:
            raise GQAPruneError(f"invalid layer importance: {problem}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "scores": list(self.scores),
            "num_samples": self.num_samples,
            "seq_len": self.seq_len,
            "model_identity": dict(self.model_identity),
            "num_layers": self.num_layers,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, data: Any) -> LayerImportance:
        """Rebuild from :meth:`to_dict` output; malformed data raises :class:`GQAPruneError`."""
        if not isinstance(data, dict):
            raise GQAPruneError(
                f"invalid layer importance: expected a JSON object, got {type(data).__name__}"
            )
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise GQAPruneError(f"invalid layer importance: missing fields {missing}")
        scores = data["scores"]
        if not isinstance(scores, list) or not all(_is_number(s) for s in scores):
            raise GQAPruneError("invalid layer importance: 'scores' must be a list of numbers")
        return cls(**{**{n: data[n] for n in names}, "scores": tuple(float(s) for s in scores)})

    def save(self, path: str | Path) -> None:
        """Write JSON atomically (the runner names it ``layer_importance_config.json``)."""
        write_json_atomic(path, self.to_dict())

    def check_matches(self, model: nn.Module) -> None:
        """Raise if this result was measured on a model of another shape or family.

        A different ``name_or_path`` alone only logs a warning (a copied or renamed model).
        """
        current = model_identity(model)
        saved = self.model_identity
        diffs = [
            f"{key} {saved[key]} vs {current[key]}"
            for key in STRUCTURAL_FIELDS
            if saved[key] != current[key]
        ]
        if _family(saved["model_type"]) != _family(current["model_type"]):
            diffs.append(f"model_type {saved['model_type']} vs {current['model_type']}")
        if diffs:
            raise GQAPruneError(
                f"layer importance was measured on another model (saved vs current: "
                f"{'; '.join(diffs)})"
            )
        if saved["name_or_path"] != current["name_or_path"]:
            log.warning(
                "layer importance was measured on '%s', the model is '%s'; same shapes, using it",
                saved["name_or_path"],
                current["name_or_path"],
            )


def _problem(r: LayerImportance) -> str | None:
    """What is wrong with ``r``, or None."""
    if r.method not in METHODS:
        return f"unknown method {r.method!r} (expected one of {', '.join(METHODS)})"
    if not isinstance(r.scores, tuple) or not all(_is_number(s) for s in r.scores):
        return "scores must be a tuple of numbers"
    for name in ("num_samples", "seq_len", "num_layers"):
        value = getattr(r, name)
        if not _is_int(value) or value < 1:
            return f"{name} must be a positive integer, got {value!r}"
    if len(r.scores) != r.num_layers:
        return f"{len(r.scores)} scores for num_layers={r.num_layers}"
    bad = [i for i, s in enumerate(r.scores) if not math.isfinite(s)]
    if bad:
        return f"non-finite scores for layers {bad}"
    if not isinstance(r.model_identity, dict):
        return "model_identity must be an object"
    missing = [k for k in IDENTITY_FIELDS if k not in r.model_identity]
    if missing:
        return f"model_identity lacks {missing}"
    if r.model_identity["num_hidden_layers"] != r.num_layers:
        return (
            f"model_identity has {r.model_identity['num_hidden_layers']} layers but "
            f"num_layers={r.num_layers}"
        )
    if not isinstance(r.extra, dict):
        return "extra must be an object"
    return None


def load_layer_importance(path: str | Path, model: nn.Module | None = None) -> LayerImportance:
    """Read a saved :class:`LayerImportance`, refusing anything it cannot trust.

    Args:
        path: a file written by :meth:`LayerImportance.save`.
        model: when given, the saved shapes (layers, hidden size, heads, KV heads, MLP
            width, family) must match it; only a different name logs a warning.

    Raises:
        GQAPruneError: the file is missing, not JSON, malformed, has non-finite or a wrong
            number of scores, or belongs to another model. The message is one line.
    """
    path = Path(path)
    if not path.is_file():
        raise GQAPruneError(f"no layer importance file at {path}; {_RERUN}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GQAPruneError(f"{path} is not valid JSON ({exc}); {_RERUN}") from exc
    try:
        result = LayerImportance.from_dict(data)
        if model is not None:
            result.check_matches(model)
    except GQAPruneError as exc:
        raise GQAPruneError(f"{path}: {exc}; {_RERUN}") from exc
    return result
