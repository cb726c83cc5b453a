"""Group offloading through diffusers' own hooks (`diffusers.hooks.apply_group_offloading`).

diffusers moves *every* parameter of a group between devices, and with `use_stream` restores each
parameter from a host snapshot taken when the hooks were applied. For a model with trainable LoRA
parameters on a GPU that means lost updates (the snapshot overwrites them) or gradients on another
device than their parameter, so a model with trainable parameters is refused whenever the onload
and offload devices differ: train with `musubi_blocks_to_swap` (LoRA stays resident there) and keep
group offloading for frozen models (renders). Quanto weights are refused too: diffusers swaps
`param.data`, which quanto's tensor subclasses do not support (torchao's it handles).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.hooks import apply_group_offloading

GROUP_OFFLOAD_TYPES = ("block_level", "leaf_level")


class GroupOffloadConflict(ValueError):
    """Group offloading asked for together with something it cannot be combined with."""


def _has_quanto_weights(model: nn.Module) -> bool:
    return any(type(p).__module__.startswith("optimum.quanto") for p in model.parameters())


def enable_group_offload(
    model: nn.Module,
    onload_device: str | torch.device,
    offload_device: str | torch.device = "cpu",
    offload_type: str = "block_level",
    blocks_per_group: int = 1,
    use_stream: bool = False,
) -> None:
    """Apply diffusers' group offloading to `model` (settings as the config's `group_offload_*`
    keys), after checking it can be combined with what the model already has."""
    if offload_type not in GROUP_OFFLOAD_TYPES:
        raise GroupOffloadConflict(f"group_offload_type={offload_type!r}: choose one of {GROUP_OFFLOAD_TYPES}")
    onload, offload = torch.device(onload_device), torch.device(offload_device)
    if getattr(model, "_block_swap", None) is not None:
        raise GroupOffloadConflict(
            "enable_group_offload cannot be combined with musubi_blocks_to_swap: both move the same block weights; "
            "set one of them (block swap for training)"
        )
    if _has_quanto_weights(model):
        raise GroupOffloadConflict(
            "enable_group_offload cannot be combined with base_model_precision int8-quanto/int4-quanto (diffusers "
            "swaps param.data, which quanto weights do not support); use musubi_blocks_to_swap, which moves them"
        )
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if trainable and onload != offload:
        raise GroupOffloadConflict(
            f"enable_group_offload cannot be combined with training LoRA on {onload} ({len(trainable)} trainable "
            f"parameters, e.g. {trainable[0]}): diffusers' hooks move every parameter of a group to {offload}, so "
            "gradients land on another device than their parameter and, with group_offload_use_stream, updates are "
            "overwritten by the host snapshot. Use musubi_blocks_to_swap for training instead"
        )
    apply_group_offloading(
        model,
        onload_device=onload,
        offload_device=offload,
        offload_type=offload_type,
        num_blocks_per_group=blocks_per_group if offload_type == "block_level" else None,
        use_stream=use_stream and onload.type == "cuda",
        non_blocking=use_stream and onload.type == "cuda",
    )
