"""Checks that a model source is complete before (and while) transformers loads it.

transformers reports a damaged source with a traceback of whatever failed first
(``SafetensorError``, ``JSONDecodeError``, ``struct.error``, ``RuntimeError`` on a shape
mismatch, ...). These checks read only headers and metadata (no tensor data) and raise
:class:`GQAPruneError` with one line naming the path and what is wrong:

* a folder: ``config.json`` (present, a JSON object, a ``model_type`` transformers knows),
  the weight files (every shard named, present, and covered by its safetensors header), the
  tokenizer files, and after loading, that every parameter got a tensor of its shape;
* a gqa-prune checkpoint: also its per-layer lists (one entry per layer);
* a GGUF file: the magic bytes, and a header and tensor table that the file holds whole.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from pathlib import Path
from typing import Any

from gqa_prune.errors import GQAPruneError

SAFETENSORS_INDEX = "model.safetensors.index.json"
# any of these makes AutoTokenizer try (tokenizer_config.json alone can name a tokenizer class)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
PER_LAYER_KEYS = ("layer_num_key_value_heads", "layer_intermediate_sizes")


def read_config(folder: Path) -> dict[str, Any]:
    """``config.json`` of a model folder as a dict with a ``model_type``.

    Raises:
        GQAPruneError: the file is unreadable, not JSON, not a JSON object, or has no
            ``model_type``.
    """
    file = folder / "config.json"
    try:
        data = json.loads(file.read_text())
    except OSError as exc:
        raise GQAPruneError(f"cannot read {file}: {exc.strerror or exc}") from exc
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        raise GQAPruneError(
            f"{file} is not valid JSON ({str(exc).splitlines()[0]}); the model folder is damaged"
        ) from exc
    if not isinstance(data, dict):
        raise GQAPruneError(f"{file} is not a JSON object; the model folder is damaged")
    if not data.get("model_type"):
        raise GQAPruneError(f"{file} has no model_type; the model folder is damaged")
    return data


def check_folder(folder: Path) -> dict[str, Any]:
    """All the checks of a Hugging Face model folder that need no loading (headers only).

    Returns:
        The folder's ``config.json``.

    Raises:
        GQAPruneError: see :func:`read_config`, :func:`check_model_type`,
            :func:`check_weight_files`, :func:`check_tokenizer_files`.
    """
    config = read_config(folder)
    check_model_type(folder, config)
    check_weight_files(folder)
    check_tokenizer_files(folder)
    return config


def check_model_type(folder: Path, config: dict[str, Any]) -> None:
    """Refuse a ``model_type`` that transformers has no class for (gqa-prune's own are fine).

    Raises:
        GQAPruneError: naming the type and the supported families.
    """
    from transformers import __version__
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    from gqa_prune.models.adapters import supported_families

    model_type = str(config["model_type"])
    if model_type.startswith("gqa_pruned_") or model_type in CONFIG_MAPPING_NAMES:
        return
    raise GQAPruneError(
        f"{folder / 'config.json'} has model_type '{model_type}', which transformers "
        f"{__version__} does not know; supported families: {supported_families()}"
    )


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder, every one present (none: a ``.bin`` folder).

    Raises:
        GQAPruneError: no weights at all, a damaged index, or a shard the index names that
            is missing.
    """
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise GQAPruneError(
                f"{index} is not a readable shard index (JSON with a weight_map); the model "
                "folder is damaged"
            ) from exc
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            raise GQAPruneError(
                f"{folder} is incomplete: {missing[0]} (listed in {SAFETENSORS_INDEX}) is "
                f"missing{f' with {len(missing) - 1} more' if len(missing) > 1 else ''}"
            )
        return [folder / name for name in names]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    if any(folder.glob("pytorch_model*.bin")):
        return []
    raise GQAPruneError(
        f"{folder} has a config.json but no weights (no model.safetensors or "
        f"{SAFETENSORS_INDEX}); copy the weights beside it or save the model again"
    )


def check_weight_files(folder: Path) -> None:
    """Every safetensors file of ``folder`` has a whole header and all the data it lists.

    safetensors checks, when it opens a file, that the header parses and that the tensors
    it lists end exactly at the end of the file: a truncated copy fails here.

    Raises:
        GQAPruneError: naming the first damaged file.
    """
    from safetensors import SafetensorError, safe_open

    for file in weight_files(folder):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise GQAPruneError(
                f"{file} is damaged or truncated ({str(exc).splitlines()[0]}); copy or save "
                "the model again"
            ) from exc


def check_tokenizer_files(folder: Path) -> None:
    """Refuse a folder with none of the files a tokenizer is loaded from."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise GQAPruneError(
            f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save it "
            "beside the weights with tokenizer.save_pretrained(folder)"
        )


def load_tokenizer(folder: Path, **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained(folder)``, with damaged files as a one-line error."""
    from transformers import AutoTokenizer

    check_tokenizer_files(folder)
    try:
        return AutoTokenizer.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise GQAPruneError(
            f"cannot load the tokenizer in {folder}: {str(exc).splitlines()[0]}; its tokenizer "
            "files are damaged"
        ) from exc


def check_per_layer_lists(folder: Path, config: dict[str, Any]) -> None:
    """A gqa-prune checkpoint's per-layer lists: one non-negative integer per layer.

    Raises:
        GQAPruneError: a list that is missing, of the wrong length, or not integers.
    """
    n_layers = config.get("num_hidden_layers")
    for key in PER_LAYER_KEYS:
        value = config.get(key)
        ok = (
            isinstance(value, list)
            and len(value) == n_layers
            and all(isinstance(v, int) and v >= 0 for v in value)
        )
        if not ok:
            raise GQAPruneError(
                f"{folder / 'config.json'} needs {key} as a list of {n_layers} non-negative "
                f"integers (one per layer), found {value!r}; the checkpoint is damaged, save it "
                "again with gqa_prune.save_pruned"
            )


def check_loading_info(folder: Path, info: dict[str, Any]) -> None:
    """After ``from_pretrained(..., output_loading_info=True, ignore_mismatched_sizes=True)``:
    every parameter got a tensor of its shape (nothing was left at random initialisation).

    Raises:
        GQAPruneError: naming the first missing or mismatched tensor.
    """
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        name, found, expected = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise GQAPruneError(
            f"{folder}: the weights do not fit config.json: {name} is {tuple(found)} in the "
            f"weights, {tuple(expected)} from the config{more}; the folder is damaged or its "
            "config.json was edited"
        )
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise GQAPruneError(
            f"{folder}: no weights for {missing[0]}{more} in its weight files; the folder is "
            "damaged or incomplete"
        )


# bytes of each scalar GGUF metadata type (gguf.GGUFValueType): u8 i8 u16 i16 u32 i32 f32 bool
# u64 i64 f64; 8 = string, 9 = array
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRINGS = (b"general.architecture", b"general.description")


def _gguf_layout(buf: Any) -> tuple[dict[str, str], int]:
    """Walk a GGUF header: ``(architecture/description strings, bytes the file must have)``.

    Reads only the header and the tensor table (a Python loop over the metadata: about a
    million entries for a 262k-token vocabulary, well under a second); the tensor data is
    not touched. Raises ``struct.error`` where the header runs past the end of ``buf``.
    """
    import gguf

    def string(pos: int) -> tuple[bytes, int]:
        (n,) = struct.unpack_from("<Q", buf, pos)
        if pos + 8 + n > len(buf):
            raise struct.error("string past the end of the file")
        return bytes(buf[pos + 8 : pos + 8 + n]), pos + 8 + n

    def skip(value_type: int, pos: int) -> int:
        if value_type in _SCALAR_BYTES:
            return pos + _SCALAR_BYTES[value_type]
        if value_type == 8:
            return string(pos)[1]
        if value_type == 9:
            item_type, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if item_type in _SCALAR_BYTES:
                return pos + count * _SCALAR_BYTES[item_type]
            for _ in range(count):
                pos = skip(item_type, pos)
            return pos
        raise ValueError(f"unknown metadata value type {value_type}")

    _, _, n_tensors, n_kv = struct.unpack_from("<4sIQQ", buf, 0)
    pos, found, alignment = 24, {}, 32
    for _ in range(n_kv):
        key, pos = string(pos)
        (value_type,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if key in _GGUF_STRINGS and value_type == 8:
            value, pos = string(pos)
            found[key.decode()] = value.decode(errors="replace")
        elif key == b"general.alignment" and value_type == 4:
            (alignment,) = struct.unpack_from("<I", buf, pos)
            pos += 4
        else:
            pos = skip(value_type, pos)
    data_end = 0
    for _ in range(n_tensors):
        pos = string(pos)[1]
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        ggml_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 16 + 8 * n_dims
        block, type_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
        data_end = max(data_end, offset + math.prod(dims) // block * type_bytes)
    return found, pos + (-pos) % max(alignment, 1) + data_end


def check_gguf(path: Path) -> dict[str, str]:
    """A GGUF file's header and tensor table are whole, and the file holds all tensor data.

    Returns:
        ``general.architecture`` and ``general.description`` (empty if absent).

    Raises:
        GQAPruneError: not a GGUF file, or a header or tensor data that the file does not
            hold whole (truncated or damaged).
    """
    try:
        with path.open("rb") as f:
            magic = f.read(4)
            if magic == b"GGUF":
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                    found, needed = _gguf_layout(buf)
                    size = len(buf)
    except OSError as exc:
        raise GQAPruneError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (struct.error, ValueError, KeyError) as exc:  # runs past the end / garbage types
        raise GQAPruneError(
            f"{path} is a damaged or truncated GGUF file: its header ends early or is "
            f"garbled ({exc})"
        ) from exc
    if magic != b"GGUF":
        raise GQAPruneError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    if size < needed:
        raise GQAPruneError(
            f"{path} is a truncated GGUF file: its tensors need {needed:,} bytes, the file has "
            f"{size:,}"
        )
    return {key.decode(): found.get(key.decode(), "") for key in _GGUF_STRINGS}
