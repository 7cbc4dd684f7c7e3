"""LoRA on the pruned shapes, through peft, merged back into the weights.

Each targeted projection ``W`` (whatever its pruned size ``out × in``) gets
``W + (lora_alpha / r) · B @ A`` with ``A: r × in``, ``B: out × r`` (B starts at zero, so the
adapted model starts equal to the pruned one). The target list holds the full module paths
of every decoder layer's projections, built from the architecture adapter, so nothing here
knows ``q_proj`` & co. After training, :func:`merge_lora` folds ``B @ A`` into ``W`` and
removes the adapters: the result has exactly the pruned shapes and saves like any pruned model.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from gqa_prune.models.adapters import get_adapter
from gqa_prune.recovery.config import FinetuneConfig


def lora_target_modules(model: nn.Module, targets: str) -> list[str]:
    """Full module names of the projections that get adapters.

    Args:
        model: a supported causal LM (not yet wrapped by peft).
        targets: ``attention`` (q/k/v/o), ``mlp`` (gate/up/down) or ``all``.

    Returns:
        Names such as ``model.layers.3.self_attn.q_proj``, layer by layer.
    """
    adapter = get_adapter(model)
    groups = {
        "attention": (
            adapter.attn_attr,
            (adapter.q_name, adapter.k_name, adapter.v_name, adapter.o_name),
        ),
        "mlp": (adapter.mlp_attr, (adapter.gate_name, adapter.up_name, adapter.down_name)),
    }
    chosen = ["attention", "mlp"] if targets == "all" else [targets]
    names = []
    for i, layer in enumerate(adapter.decoder_layers(model)):
        for block_attr, proj_names in (groups[c] for c in chosen):
            if block_attr == adapter.attn_attr and not adapter.has_attention(layer):
                continue
            names += [f"{adapter.layers_attr}.{i}.{block_attr}.{p}" for p in proj_names]
    return names


def apply_lora(model: nn.Module, config: FinetuneConfig) -> Any:
    """Wrap ``model`` with LoRA adapters (peft); only the adapters are trainable.

    The adapters are fp32 even on a bf16 base (peft's ``autocast_adapter_dtype``), so the
    trained weights are fp32 master weights.

    Returns:
        The ``peft.PeftModel``; ``model`` itself is modified (adapters injected).
    """
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=lora_target_modules(model, config.lora_targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora_config)


def merge_lora(peft_model: Any) -> nn.Module:
    """Fold the adapters into the projection weights and remove them.

    Returns:
        The original model object, with plain ``nn.Linear`` projections again.
    """
    return peft_model.merge_and_unload()
