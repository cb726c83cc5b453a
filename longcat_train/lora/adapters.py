"""PEFT adapters for training."""

from __future__ import annotations

import re

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from ..config.training import DEFAULT_LORA_TARGETS as DEFAULT_TARGETS  # module names relative to each block
from .weights import LoraWeights
from .fused_linear import use_fused_lora_linears

ADAPTER = "default"


def target_regex(targets: tuple[str, ...] | list[str]) -> str:
    """A full-match regex over module names that only ever hits linears inside `blocks.N.` —
    never the patch embedder or the final layer by accident."""
    alternatives = "|".join(re.escape(t) for t in targets)
    return rf"^blocks\.\d+\.({alternatives})$"


def add_lora(
    transformer: torch.nn.Module,
    rank: int,
    alpha: float | None = None,
    targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS,
    dropout: float = 0.0,
    init: str | bool = True,
) -> LoraConfig:
    """Freeze the transformer and attach one trainable LoRA adapter (fp32 parameters)."""
    transformer.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        target_modules=target_regex(targets),
        lora_dropout=dropout,
        init_lora_weights=init,
    )
    transformer.add_adapter(config, adapter_name=ADAPTER)
    for name, param in transformer.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
            param.requires_grad_(True)
    return config


def lora_state(transformer: torch.nn.Module, alpha: float) -> LoraWeights:
    """The adapter's weights as module name → (down, up, alpha)."""
    state = get_peft_model_state_dict(transformer, adapter_name=ADAPTER)
    return LoraWeights.from_peft_state(state, alpha)


def load_lora_into_adapter(transformer: torch.nn.Module, weights: LoraWeights) -> None:
    result = set_peft_model_state_dict(transformer, weights.to_peft_state(), adapter_name=ADAPTER)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ValueError(f"LoRA keys that match no adapter module: {unexpected[:5]}")


def compute_lora_in_autocast_dtype(model: torch.nn.Module) -> None:
    """Under bf16 autocast, stop PEFT copying every LoRA input to fp32 (the adapter's dtype) before
    autocast casts it back to bf16 for the matmul: two memory-bound passes per adapter, same result.
    Also fuse each LoRA linear's epilogue into its GEMMs on CUDA (`fused_linear`; PEFT's forward
    runs wherever that does not apply)."""
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False
    use_fused_lora_linears(model)
