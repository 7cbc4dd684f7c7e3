"""Save and reload pruned models: safetensors + JSON config + shipped modeling code.

A checkpoint folder holds ``model.safetensors`` (sharded when large), ``config.json`` with
``model_type: gqa_pruned_<family>``, per-layer ``layer_num_key_value_heads`` /
``layer_intermediate_sizes`` and an ``auto_map``, the tokenizer files, and the two small
modeling files from ``gqa_prune/models/remote`` (which import only transformers). So both
``gqa_prune.load_pruned(dir)`` and
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` rebuild it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from gqa_prune.errors import GQAPruneError
from gqa_prune.io_utils import atomic_directory, write_json_atomic
from gqa_prune.models import remote, source_checks
from gqa_prune.models.adapters import get_adapter
from gqa_prune.models.device import resolve_device, resolve_dtype
from gqa_prune.models.geometry import update_config_
from gqa_prune.models.remote import modeling_gqa_pruned

REMOTE_FILES = ("configuration_gqa_pruned.py", "modeling_gqa_pruned.py")


def pruned_config_dict(model: Any) -> dict[str, Any]:
    """The config.json of a pruned model: family config + per-layer shapes + auto_map."""
    adapter = get_adapter(model)
    update_config_(model.config, adapter.geometry(model))
    data = model.config.to_dict()
    data.pop("quantization_config", None)
    data["model_type"] = adapter.pruned_model_type
    data["architectures"] = [adapter.pruned_class]
    data["auto_map"] = {
        "AutoConfig": f"configuration_gqa_pruned.{adapter.pruned_config_class}",
        "AutoModelForCausalLM": f"modeling_gqa_pruned.{adapter.pruned_class}",
    }
    return data


def save_pruned(
    model: Any,
    tokenizer: Any,
    out_dir: str | Path,
    overwrite: bool = False,
    max_shard_size: str = "2GB",
) -> Path:
    """Write a reloadable checkpoint folder, atomically (temp folder, then rename).

    Raises:
        GQAPruneError: ``out_dir`` exists and ``overwrite`` is False, or is not writable.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise GQAPruneError(f"{out_dir} already exists; pass --overwrite to replace it")
    config_data = pruned_config_dict(model)
    try:
        with atomic_directory(out_dir, overwrite=overwrite) as tmp:
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            write_json_atomic(tmp / "config.json", config_data)
            src = Path(remote.__file__).parent
            for name in REMOTE_FILES:
                shutil.copyfile(src / name, tmp / name)
    except OSError as exc:
        raise GQAPruneError(f"cannot write checkpoint {out_dir}: {exc}") from exc
    return out_dir


def load_pruned(path: str | Path, dtype: str = "auto", device: str = "auto") -> tuple[Any, Any]:
    """Rebuild a checkpoint written by :func:`save_pruned` without remote code.

    Returns:
        ``(model, tokenizer)``; the tokenizer is None if the folder has none.
    """
    path = Path(path)
    data = source_checks.read_config(path)
    model_type = data.get("model_type", "")
    if not str(model_type).startswith("gqa_pruned_"):
        raise GQAPruneError(
            f"{path} has model_type '{model_type}', not a gqa-prune checkpoint; load it with "
            "load_model instead"
        )
    source_checks.check_per_layer_lists(path, data)
    source_checks.check_weight_files(path)
    adapter = get_adapter(str(model_type))
    cls = getattr(modeling_gqa_pruned, adapter.pruned_class)
    dev = resolve_device(device)
    model, info = cls.from_pretrained(
        path,
        dtype=resolve_dtype(dtype, dev),
        output_loading_info=True,
        ignore_mismatched_sizes=True,  # reported in `info`, refused with the tensor's name
    )
    source_checks.check_loading_info(path, info)
    tokenizer = None
    if any((path / name).is_file() for name in source_checks.TOKENIZER_FILES):
        # the tokenizer needs no model code: never ask about the shipped modeling files
        tokenizer = source_checks.load_tokenizer(path, trust_remote_code=False)
    return model.to(dev).eval(), tokenizer
