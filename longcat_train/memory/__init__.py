"""Fitting the 13.6B DiT into GPU memory: quantized base weights, block swapping, diffusers group
offloading, and a planner that predicts peak VRAM and host RAM per bucket."""

from .block_swap import BlockSwap, enable_block_swap
from .group_offload import GroupOffloadConflict, enable_group_offload
from .planner import (
    PLANNED_KEYS,
    MemoryPlan,
    MemorySettings,
    PlanRefusal,
    machine_memory_gib,
    offload_requests,
    plan_memory,
    planned_config_keys,
    render_fits,
    render_peak_gib,
)
from .quantize import (
    QUANTIZED_PRECISIONS,
    QuantizationError,
    load_frozen_transformer,
    load_quantized_transformer,
    quantize_block,
    quantize_transformer,
)

__all__ = [
    "PLANNED_KEYS",
    "BlockSwap",
    "GroupOffloadConflict",
    "MemoryPlan",
    "MemorySettings",
    "PlanRefusal",
    "QUANTIZED_PRECISIONS",
    "QuantizationError",
    "enable_block_swap",
    "enable_group_offload",
    "load_frozen_transformer",
    "load_quantized_transformer",
    "machine_memory_gib",
    "offload_requests",
    "plan_memory",
    "planned_config_keys",
    "quantize_block",
    "render_fits",
    "render_peak_gib",
    "quantize_transformer",
]
