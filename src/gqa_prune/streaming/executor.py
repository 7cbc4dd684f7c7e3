"""Run a model one decoder layer at a time, with only that layer on the compute device.

::

    host (CPU RAM)                       compute device (GPU, or the CPU itself)
    ----------------------------------   -------------------------------------------
    decoder layers at rest: in RAM, or   embed_tokens, rotary tables, final norm,
      on disk (--offload_dir, one        lm_head                  (resident, whole run)
      safetensors file per layer)
    boundary hidden states of every      layer i  <- fetched, worked on, parked again
      calibration batch (model dtype)    one batch of its activations at a time

Every algorithm in :mod:`gqa_prune.streaming` walks the layers in order (or in reverse for
Taylor's backward) and runs *all* calibration batches through a layer while it is on the
device, so each pass moves every layer's weights once.

The arguments a model passes to its decoder layers (rotary position embeddings, causal
mask, ...) are recorded from the model's own forward with stand-ins in place of the decoder
layers, which record their call and pass the hidden states through (no layer weights are
needed); the last one ends that forward. Each layer is later replayed with its own call, so
models that mix attention types (Gemma's sliding/full layers, each with its own mask and
rotary tables) stream exactly as they run.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gqa_prune.analysis.decoder_stack import (
    LayerCall,
    LayerCalls,
    OutputHead,
    hidden_of,
    layers_replaced,
    record_layer_calls,
)
from gqa_prune.errors import GQAPruneError
from gqa_prune.models.adapters import ArchitectureAdapter, get_adapter
from gqa_prune.models.device import resolve_device
from gqa_prune.streaming.memory import module_bytes, outside_bytes, parse_memory

log = logging.getLogger(__name__)

LAYER_FILE = "layer_{:05d}.safetensors"


@dataclass(frozen=True)
class StreamingConfig:
    """Where a streamed model's parts live.

    Attributes:
        device: compute device (``auto``, ``cpu``, ``cuda``, ``cuda:N``): the resident
            modules and the one layer being worked on.
        max_memory: cap of the compute device (bytes or a size such as ``"20GiB"``);
            checked against an estimate before the work starts; None = no check.
        offload_dir: keep the decoder layers on disk under this folder (one safetensors
            file per layer, in a fresh sub-folder removed when the streamer is closed)
            instead of in CPU RAM.
    """

    device: str = "auto"
    max_memory: int | str | None = None
    offload_dir: str | None = None

    @property
    def max_memory_bytes(self) -> int | None:
        return None if self.max_memory is None else parse_memory(self.max_memory)


class _RamStore:
    """Layers rest in CPU RAM as ordinary modules."""

    where = "cpu"

    def park(self, index: int, layer: nn.Module, changed: bool) -> None:
        layer.to("cpu")

    def fetch(self, index: int, layer: nn.Module, device: torch.device) -> None:
        layer.to(device)

    def close(self) -> None:
        pass


class _DiskStore:
    """Layers rest on disk: one safetensors file each; the module keeps meta tensors."""

    where = "disk"

    def __init__(self, root: str | Path) -> None:
        root = Path(root).expanduser()
        try:
            root.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix="gqa_prune_layers_", dir=root))
        except OSError as exc:
            raise GQAPruneError(f"cannot write layers to --offload_dir {root}: {exc}") from exc
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.path, ignore_errors=True)

    def file(self, index: int) -> Path:
        return self.path / LAYER_FILE.format(index)

    def write(self, index: int, state: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        try:
            save_file(tensors, str(self.file(index)))
        except OSError as exc:
            raise GQAPruneError(f"cannot write layer {index} to {self.path}: {exc}") from exc

    def park(self, index: int, layer: nn.Module, changed: bool) -> None:
        if changed or not self.file(index).is_file():
            self.write(index, layer.state_dict())
        layer.to("meta")

    def fetch(self, index: int, layer: nn.Module, device: torch.device) -> None:
        from safetensors.torch import load_file

        state = load_file(str(self.file(index)), device=str(device))
        # assign=True: the module takes the loaded tensors (no second copy); requires_grad
        # flags stay those of the module
        layer.load_state_dict(state, assign=True)

    def close(self) -> None:
        self._cleanup()


class LayerStreamer:
    """A model whose decoder layers visit the compute device one at a time.

    Build it once per model; it moves everything but the decoder layers to the device
    and parks the layers (CPU RAM, or disk with ``offload_dir``). The model stays usable
    by the streaming functions (:func:`~gqa_prune.streaming.streaming_unit_scores`,
    :func:`~gqa_prune.streaming.streaming_layer_importance`, ...); call :meth:`gather_`
    to bring all of it back into one place (e.g. to save it), :meth:`close` to delete
    the offloaded files.

    Args:
        model: a causal LM of a supported family; its layers may already be on ``meta``
            with files written by :func:`~gqa_prune.streaming.load_model_offloaded`.
        config: device, memory cap and offload folder.
        layer_files: folder already holding one file per layer (from the offloaded
            loader); None = write them now (``offload_dir``) or keep the layers in RAM.
    """

    def __init__(
        self,
        model: nn.Module,
        config: StreamingConfig | None = None,
        layer_files: _DiskStore | None = None,
    ) -> None:
        self.config = config or StreamingConfig()
        self.model = model
        self.adapter: ArchitectureAdapter = get_adapter(model)
        self.layers = self.adapter.decoder_layers(model)
        self.device = resolve_device(self.config.device)
        self.max_memory = self.config.max_memory_bytes
        self._index = {id(layer): i for i, layer in enumerate(self.layers)}
        model.eval()
        self.store: _RamStore | _DiskStore
        if layer_files is not None:
            self.store = layer_files
        elif self.config.offload_dir is not None:
            self.store = _DiskStore(self.config.offload_dir)
        else:
            self.store = _RamStore()
        self.host = torch.device("cpu")
        self.layers_rest_on = self.store.where
        for i, layer in enumerate(self.layers):
            if not _is_meta(layer):
                self.store.park(i, layer, changed=True)
            elif not isinstance(self.store, _DiskStore) or not self.store.file(i).is_file():
                raise GQAPruneError(
                    f"decoder layer {i} has no weights (meta tensors) and no offloaded file"
                )
        self._move_resident(self.device)
        self.head = OutputHead(model)

    # ------------------------------------------------------------------ placement
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def layers_in_device_memory(self) -> bool:
        """The parked layers share the compute device's memory (CPU device, RAM store)."""
        return isinstance(self.store, _RamStore) and self.device.type == "cpu"

    def _move_resident(self, device: torch.device) -> None:
        """Move everything except the decoder layers (which are detached meanwhile)."""
        with layers_replaced(self.model, nn.ModuleList()):
            self.model.to(device)

    def resident_bytes(self) -> int:
        """Bytes of everything outside the decoder layers (kept on the device)."""
        return outside_bytes(self.model, list(self.layers))

    @contextmanager
    def layer(self, index: int, changed: bool = False) -> Iterator[nn.Module]:
        """Layer ``index`` on the compute device inside the block, parked again after it.

        Args:
            index: decoder layer index.
            changed: the block modifies the layer (pruning): a disk store rewrites its file.
        """
        module = self.layers[index]
        self.store.fetch(index, module, self.device)
        try:
            yield module
        finally:
            self.store.park(index, module, changed)

    def gather_(self, device: str | torch.device = "cpu") -> nn.Module:
        """Bring the whole model onto ``device`` (loads every parked layer); returns it.

        After this the streamer no longer manages the layers; build a new one to stream again.
        """
        device = torch.device(device)
        for i, layer in enumerate(self.layers):
            if _is_meta(layer):
                self.store.fetch(i, layer, device)
            else:
                layer.to(device)
        self.model.to(device)
        self.store.close()  # the layer files are no longer needed
        self.store = _RamStore()
        return self.model

    def close(self) -> None:
        """Delete the offloaded layer files (a no-op for layers kept in RAM)."""
        self.store.close()

    def describe(self) -> dict[str, Any]:
        """Settings and placement, for ``summary.json``."""
        return {
            "device": str(self.device),
            "layers_rest_on": self.layers_rest_on,
            "offload_dir": self.config.offload_dir,
            "max_memory_bytes": self.max_memory,
            "resident_bytes": self.resident_bytes(),
            "largest_layer_bytes": max(module_bytes(layer) for layer in self.layers),
        }

    # ------------------------------------------------------------------ running
    def capture(
        self, batches: Sequence[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[LayerCalls]]:
        """Hidden states entering layer 0 (on the host) and every layer's call, per batch
        (:func:`~gqa_prune.analysis.decoder_stack.record_layer_calls`)."""
        return record_layer_calls(self.model, batches, self.device, self.host)

    def run(
        self, layer: nn.Module, hidden: torch.Tensor, call: LayerCall | LayerCalls
    ) -> torch.Tensor:
        """One layer on one batch: host or device hidden states in, device hidden states out.

        ``call`` is the layer's own call, or the batch's :class:`LayerCalls` (the entry of
        ``layer`` is used).
        """
        if isinstance(call, LayerCalls):
            call = call.of(self._index[id(layer)])
        return hidden_of(layer(hidden.to(self.device), *call.args, **call.kwargs))

    def forward_(
        self,
        states: list[torch.Tensor],
        calls: Sequence[LayerCalls],
        desc: str = "",
        progress: bool = False,
    ) -> None:
        """Run every layer over every batch, replacing ``states`` by the last layer's output."""
        from tqdm.auto import tqdm

        with torch.no_grad():
            for i in tqdm(range(self.num_layers), desc=desc or "layers", disable=not progress):
                with self.layer(i) as layer:
                    for b, call in enumerate(calls):
                        states[b] = self.run(layer, states[b], call).to(self.host)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + lm_head on the device: (B, L, H) -> (B, L, V)."""
        return self.head(hidden.to(self.device))

    def loss(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The model's own causal-LM loss (mean next-token cross entropy) of one batch.

        Uses ``model.loss_function`` when the model has one, exactly as
        ``model(input_ids, labels=input_ids).loss`` does.
        """
        logits = self.logits(hidden)
        labels = input_ids.to(self.device)
        loss_fn = getattr(self.model, "loss_function", None)
        if loss_fn is not None:
            return loss_fn(logits=logits, labels=labels, vocab_size=logits.shape[-1])
        return nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
        )


def _is_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())
