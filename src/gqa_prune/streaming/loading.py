"""Load a model for streaming without ever holding all of it in memory.

With ``--offload_dir``, a Hugging Face folder with safetensors weights is read one tensor
at a time (safetensors memory-maps the file): the modules outside the decoder layers go to
CPU RAM, each decoder layer's tensors are converted to the run's dtype and written to its
own file under the offload folder, and the model's layers keep only meta tensors. Peak RAM
is then about one layer plus the embeddings, whatever the model size.

Other sources (GGUF files, hub ids, built-in names, pruned checkpoints) are loaded whole
into CPU RAM first and then offloaded (logged).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from gqa_prune.errors import GQAPruneError
from gqa_prune.models import source_checks
from gqa_prune.models.adapters import get_adapter
from gqa_prune.models.device import resolve_device, resolve_dtype
from gqa_prune.models.loading import load_model
from gqa_prune.streaming.executor import LayerStreamer, StreamingConfig, _DiskStore

log = logging.getLogger(__name__)


def _weight_files(path: Path) -> dict[str, Path] | None:
    """tensor name -> safetensors file of a folder, or None if it has no safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}  # noqa: SIM118  (a safe_open handle)


def _is_plain_folder(path: Path) -> bool:
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type", "")
    except (OSError, ValueError):
        return False
    return not str(model_type).startswith("gqa_pruned_")


def load_model_offloaded(
    source: str, dtype: str, config: StreamingConfig
) -> tuple[Any, Any, LayerStreamer]:
    """``(model, tokenizer, streamer)`` with the decoder layers on disk from the start.

    Args:
        source: as :func:`gqa_prune.load_model`.
        dtype: ``auto`` (bf16 on CUDA, fp32 on CPU, for the compute device), ``float32``,
            ``bfloat16`` or ``float16``.
        config: streaming settings; ``offload_dir`` must be set.
    """
    if config.offload_dir is None:
        raise GQAPruneError("load_model_offloaded needs StreamingConfig(offload_dir=...)")
    torch_dtype = resolve_dtype(dtype, resolve_device(config.device))
    dtype_name = str(torch_dtype).removeprefix("torch.")
    path = Path(source).expanduser()
    plain = path.is_dir() and _is_plain_folder(path)
    if plain:  # a damaged folder is refused in one line before anything is offloaded
        source_checks.check_folder(path)
    files = _weight_files(path) if plain else None
    if files is None:
        log.warning(
            "%s is not a folder of safetensors weights: loading it whole into CPU RAM, then "
            "offloading its layers to %s",
            source,
            config.offload_dir,
        )
        model, tokenizer = load_model(source, dtype=dtype_name, device="cpu")
        return model, tokenizer, LayerStreamer(model, config)

    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    hf_config = AutoConfig.from_pretrained(str(path))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    with init_empty_weights(include_buffers=False):  # rotary tables are real, weights meta
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch_dtype)
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    layer_key = re.compile(rf"^{re.escape(adapter.layers_attr)}\.(\d+)\.(.+)$")
    store = _DiskStore(config.offload_dir)
    by_layer: dict[int, dict[str, Path]] = {}
    other: dict[str, Path] = {}
    for name, file in files.items():
        match = layer_key.match(name)
        if match:
            by_layer.setdefault(int(match.group(1)), {})[match.group(2)] = file
        else:
            other[name] = file

    def read(name: str, file: Path) -> torch.Tensor:
        with safe_open(str(file), framework="pt") as f:
            tensor = f.get_tensor(name)
        return tensor.to(torch_dtype) if tensor.is_floating_point() else tensor

    params = dict(model.named_parameters())
    for name, file in other.items():
        if name in params:
            set_module_tensor_to_device(model, name, "cpu", value=read(name, file))
    if getattr(hf_config, "tie_word_embeddings", False):
        model.tie_weights()
    for i, layer in enumerate(layers):
        expected = set(layer.state_dict())
        found = by_layer.get(i, {})
        if set(found) != expected:
            raise GQAPruneError(
                f"{path}: layer {i} has tensors {sorted(found)} in its safetensors files, "
                f"expected {sorted(expected)}; load it without --offload_dir"
            )
        prefix = f"{adapter.layers_attr}.{i}."
        store.write(i, {k: read(prefix + k, f) for k, f in found.items()})
    missing = [n for n, p in model.named_parameters() if p.is_meta and not layer_key.match(n)]
    if missing:
        raise GQAPruneError(
            f"{path}: no weights for {missing} in its safetensors files; load it without "
            "--offload_dir"
        )
    model.eval()
    log.info("offloaded %d decoder layers of %s to %s", len(layers), source, store.path)
    return model, tokenizer, LayerStreamer(model, config, layer_files=store)
