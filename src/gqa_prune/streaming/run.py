"""Choose in-memory or streaming mode for a run, and load the model accordingly.

- ``--streaming`` or ``--offload_dir``: streaming.
- ``--max_memory SIZE`` alone: in memory when the estimate of the in-memory run fits
  ``SIZE``, else streaming (logged).
- none of them: in memory, as before.
"""

from __future__ import annotations

import logging
from typing import Any

from gqa_prune.errors import GQAPruneError
from gqa_prune.models.device import resolve_device, resolve_dtype
from gqa_prune.models.loading import load_model
from gqa_prune.streaming.executor import LayerStreamer, StreamingConfig
from gqa_prune.streaming.loading import load_model_offloaded
from gqa_prune.streaming.memory import gib
from gqa_prune.streaming.pipeline import check_streaming_memory, plan_memory

log = logging.getLogger(__name__)

# run options that need the whole model on one device
_NEEDS_DENSE = {
    "eval_tasks": "--eval_tasks",
    "measure_speed": "--measure_speed",
    "finetune": "--finetune",
}


def streaming_config(config: Any) -> StreamingConfig:
    """The :class:`StreamingConfig` of a :class:`~gqa_prune.RunConfig`."""
    return StreamingConfig(
        device=config.device, max_memory=config.max_memory, offload_dir=config.offload_dir
    )


def check_streaming_options(config: Any) -> None:
    """Refuse the run options that streaming mode does not support (they need the whole
    model on one device)."""
    used = [flag for name, flag in _NEEDS_DENSE.items() if getattr(config, name, None)]
    if used:
        raise GQAPruneError(
            f"{', '.join(used)} need(s) the whole model on one device, which streaming mode "
            "(--streaming, --offload_dir, or a --max_memory the model does not fit) does not "
            "give; run those steps on the saved pruned model instead"
        )


def load_for_run(config: Any) -> tuple[Any, Any, LayerStreamer | None]:
    """``(model, tokenizer, streamer)``; ``streamer`` is None in memory mode.

    In streaming mode the memory cap is checked before any work (a clear error when even
    one layer does not fit).
    """
    wants_streaming = config.streaming or config.offload_dir is not None
    if not wants_streaming and config.max_memory is None:
        model, tokenizer = load_model(config.base_model, dtype=config.dtype, device=config.device)
        return model, tokenizer, None
    stream = streaming_config(config)
    dtype = str(resolve_dtype(config.dtype, resolve_device(config.device))).removeprefix("torch.")
    importance_args = (
        config.taylor_batch_size,
        config.taylor_seq_len,
        config.importance,
        config.compensation,
    )
    settings = dict(
        selection=config.selection,
        target=config.compensation_target,
        mode=config.pruning_mode,
        sensitivity_weights=config.sensitivity_weights,
        calibration_tokens=config.compensation_samples * config.compensation_seq_len,
        compensation_seq_len=config.compensation_seq_len,
    )
    if config.offload_dir is not None:
        check_streaming_options(config)
        model, tokenizer, streamer = load_model_offloaded(config.base_model, dtype, stream)
        check_streaming_memory(streamer, *importance_args, **settings)
        return model, tokenizer, streamer
    model, tokenizer = load_model(config.base_model, dtype=dtype, device="cpu")
    if not config.streaming:  # only --max_memory: stream only if the model does not fit
        cap = stream.max_memory_bytes
        dense = plan_memory(model, *importance_args, layers_in_device_memory=True, **settings).dense
        if cap is not None and dense <= cap:
            log.info(
                "in-memory mode: the run needs about %s, within --max_memory %s",
                gib(dense),
                gib(cap),
            )
            return model.to(resolve_device(config.device)), tokenizer, None
        log.info(
            "streaming mode: the in-memory run needs about %s, more than --max_memory %s",
            gib(dense),
            gib(cap or 0),
        )
    check_streaming_options(config)
    streamer = LayerStreamer(model, stream)
    check_streaming_memory(streamer, *importance_args, **settings)
    return model, tokenizer, streamer
