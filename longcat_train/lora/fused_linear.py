"""PEFT's LoRA linear with its epilogue fused into cuBLAS, for bf16 autocast training.

PEFT computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`: the LoRA up-projection writes a
full-size output, a multiply and an add each read and write it again, and backward adds a multiply
over the output gradient and an add of the two input gradients. Here the rank-32 up-projection
writes the output first (alpha = scaling) and the base GEMM accumulates into it (`addmm_`, beta = 1):
the compute-bound base GEMM reads the LoRA term in its epilogue almost for free, where adding the
LoRA term afterwards cost a memory-bound read-modify-write pass over the whole output (measured
≈ 8 ms per block at 480x832x93 on an H200). Backward builds the input gradient the same way; only the
rank-sized intermediates are scaled. Same math, fewer bf16 roundings (each sum is rounded once).

The fast path runs only where it computes exactly what PEFT would (one vanilla adapter, no
dropout, a plain frozen `nn.Linear` base without hooks, the base weight in the autocast dtype) and
only under autocast on CUDA; everything else — CPU, fp32, DoRA, merged or disabled adapters,
quantized bases — goes through PEFT's own forward. The module stays a PEFT `lora.Linear` (a
subclass swapped in place), so adapter state dicts, merging and unloading are PEFT's.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as PeftLoraLinear

# device types whose autocast takes the fused path (tests add "cpu" to exercise it without a GPU)
FUSED_DEVICE_TYPES: tuple[str, ...] = ("cuda",)


class _LoraLinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b + s·(x Aᵀ) Bᵀ with frozen W, b; all operands already in one dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float):
        with torch.autocast(x.device.type, enabled=False):
            h = F.linear(x, lora_a)  # [..., r]
            h2 = h.view(-1, h.shape[-1])
            if bias is not None:
                y = torch.addmm(bias, h2, lora_b.t(), alpha=scaling)
            else:  # beta = 0: the uninitialised input is ignored
                y = h2.new_empty(h2.shape[0], lora_b.shape[0])
                torch.addmm(y, h2, lora_b.t(), beta=0, alpha=scaling, out=y)
            y.addmm_(x.reshape(-1, x.shape[-1]), weight.t())
        ctx.save_for_backward(x, weight, lora_a, lora_b, h)
        ctx.scaling = scaling
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_a, lora_b, h = ctx.saved_tensors
        s = ctx.scaling
        need_x, _, _, need_a, need_b, _ = ctx.needs_input_grad
        g = dy.reshape(-1, dy.shape[-1])
        h2 = h.view(-1, h.shape[-1])
        dx = da = db = None
        with torch.autocast(dy.device.type, enabled=False):
            dh = g @ lora_b  # [M, r]: scaling applied here, on the small tensor, not on dy
            if s != 1.0:
                dh.mul_(s)
            if need_b:
                db = g.t() @ h2
                if s != 1.0:
                    db.mul_(s)
            if need_a:
                da = dh.t() @ x.reshape(-1, x.shape[-1])
            if need_x:
                dx = (dh @ lora_a).addmm_(g, weight).view(x.shape)
        return dx, None, None, da, db, None


class FusedLoraLinear(PeftLoraLinear):
    """`peft.tuners.lora.layer.Linear` whose forward takes `_LoraLinearFunction` when it can."""

    def _fused_adapter(self, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
        """The one active adapter if the fused path computes exactly PEFT's result, else None."""
        device_type = x.device.type
        if args or kwargs or self.disable_adapters or self.merged or self.fan_in_fan_out:
            return None
        if device_type not in FUSED_DEVICE_TYPES or not torch.is_autocast_enabled(device_type):
            return None
        active = [a for a in self.active_adapters if a in self.lora_A]
        if len(active) != 1 or active[0] in self.lora_variant:
            return None
        name = active[0]
        if not isinstance(self.lora_dropout[name], nn.Identity):
            return None
        if self.lora_A[name].bias is not None or self.lora_B[name].bias is not None:
            return None
        base = self.base_layer
        # hooks or a replaced forward (offloading, quantization) must keep running: not bypassed
        if type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks or "forward" in vars(base):
            return None
        frozen = [p for p in (base.weight, base.bias) if p is not None]
        dtype = torch.get_autocast_dtype(device_type)
        if any(p.requires_grad or type(p.data) is not torch.Tensor or p.dtype != dtype for p in frozen):
            return None
        return name

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._fused_adapter(x, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        dtype = self.base_layer.weight.dtype
        # the casts autocast would make, outside the Function so their gradients reach fp32 A and B
        lora_a = self.lora_A[name].weight.to(dtype)
        lora_b = self.lora_B[name].weight.to(dtype)
        return _LoraLinearFunction.apply(x.to(dtype), self.base_layer.weight, self.base_layer.bias,
                                         lora_a, lora_b, float(self.scaling[name]))


def use_fused_lora_linears(model: nn.Module) -> int:
    """Swap every PEFT `lora.Linear` in `model` for `FusedLoraLinear` (same state, same parameters);
    returns how many were swapped."""
    swapped = 0
    for module in model.modules():
        if type(module) is PeftLoraLinear:
            module.__class__ = FusedLoraLinear
            swapped += 1
    return swapped
