"""Any number of LoRAs on a frozen transformer for renders, as forward hooks: base weights are never
modified (no merge rounding in bf16, no un-merge), strengths are per LoRA, and removing the handle
restores the model exactly."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .formats import unknown_module_names
from .weights import LoraWeights


class LoraHandle:
    """The hooks of `apply_loras`; `remove()` (or leaving a `with` block) takes them all off."""

    def __init__(self, hooks):
        self._hooks = hooks

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __enter__(self) -> "LoraHandle":
        return self

    def __exit__(self, *_) -> None:
        self.remove()


def apply_loras(model: torch.nn.Module, loras: list[tuple[LoraWeights, float]]) -> LoraHandle:
    hooks = []
    modules = dict(model.named_modules())
    for weights, strength in loras:
        unknown = unknown_module_names(weights, model)
        if unknown:
            raise ValueError(f"LoRA modules not in this transformer: {unknown[:5]} (is it a LongCat-Video LoRA?)")
        for name, m in weights.modules.items():
            target = modules[name]
            param = next(target.parameters())
            down = m.down.to(param.device, param.dtype)
            up = (m.up * (m.scale * strength)).to(param.device, param.dtype)

            def hook(_module, args, output, down=down, up=up):
                # as the official loader does: the input rounded to the LoRA's (the model's) dtype,
                # then computed where the layer computes (fp32 for the modulation and final layers)
                x = args[0].to(down.dtype).to(output.dtype)
                low = F.linear(x, down.to(output.dtype))
                # output + low·upᵀ in one GEMM whose epilogue adds the layer's output: at a render's
                # 36k tokens the separate product and sum would each pass over the whole output again
                flat = torch.addmm(output.reshape(-1, output.shape[-1]), low.reshape(-1, low.shape[-1]),
                                   up.to(output.dtype).t())
                return flat.view(output.shape)

            hooks.append(target.register_forward_hook(hook))
    return LoraHandle(hooks)
