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

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as PeftLoraLinear

from ..model.activation_offload import keep_on_host

# device types whose autocast takes the fused path (tests add "cpu" to exercise it without a GPU)
FUSED_DEVICE_TYPES: tuple[str, ...] = ("cuda",)


def _lora_output(x, bias, lora_a, lora_b, scaling: float):
    """(s·(x Aᵀ) Bᵀ + b, x Aᵀ) with x flattened to rows: the output the base GEMM accumulates into."""
    h = F.linear(x, lora_a)  # [..., r]
    h2 = h.view(-1, h.shape[-1])
    if bias is not None:
        y = torch.addmm(bias, h2, lora_b.t(), alpha=scaling)
    else:  # beta = 0: the uninitialised input is ignored
        y = h2.new_empty(h2.shape[0], lora_b.shape[0])
        torch.addmm(y, h2, lora_b.t(), beta=0, alpha=scaling, out=y)
    return y, h


def _rank_grad(g, lora_b, scaling: float):
    """dL/d(x Aᵀ) = s·(g B), scaled on the rank-sized tensor rather than on g."""
    dh = g @ lora_b
    return dh.mul_(scaling) if scaling != 1.0 else dh


def _input_grad(g, dh, weight, lora_a):
    """dL/dx = dh A + g W, the LoRA term written first and the base GEMM accumulating into it."""
    return (dh @ lora_a).addmm_(g, weight)


def _adapter_grads(need_a: bool, need_b: bool, g, dh, x, h, scaling: float):
    """(dL/dA, dL/dB), each None where not needed."""
    da = dh.t() @ x.reshape(-1, x.shape[-1]) if need_a else None
    db = None
    if need_b:
        db = g.t() @ h.view(-1, h.shape[-1])
        if scaling != 1.0:
            db.mul_(scaling)
    return da, db


# A registered op rather than an autograd.Function so that selective activation checkpointing sees
# one op per projection and can keep its output (`role` names the projection to the checkpoint
# policy; see `model.transformer`): the recomputation then skips that GEMM.
@torch.library.custom_op("longcat::lora_linear", mutates_args=())
def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float, role: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x Wᵀ + b + s·(x Aᵀ) Bᵀ with rows flattened, x Aᵀ) for frozen W, b; operands in one dtype."""
    with torch.autocast(x.device.type, enabled=False):
        y, h = _lora_output(x, bias, lora_a, lora_b, scaling)
        y.addmm_(x.reshape(-1, x.shape[-1]), weight.t())
    return y, h


@lora_linear.register_fake
def _lora_linear_fake(x, weight, bias, lora_a, lora_b, scaling, role):
    rows = x.numel() // x.shape[-1]
    return x.new_empty(rows, weight.shape[0]), x.new_empty(*x.shape[:-1], lora_a.shape[0])


def _lora_linear_setup(ctx, inputs, output):
    x, weight, _bias, lora_a, lora_b, scaling, _role = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1])
    ctx.scaling = scaling


def _lora_linear_backward(ctx, dy, _dh):
    x, weight, lora_a, lora_b, h = ctx.saved_tensors
    g = dy.reshape(-1, dy.shape[-1])
    with torch.autocast(dy.device.type, enabled=False):
        dh = _rank_grad(g, lora_b, ctx.scaling)
        da, db = _adapter_grads(ctx.needs_input_grad[3], ctx.needs_input_grad[4], g, dh, x, h, ctx.scaling)
        dx = _input_grad(g, dh, weight, lora_a).view(x.shape) if ctx.needs_input_grad[0] else None
    return dx, None, None, da, db, None, None


torch.library.register_autograd("longcat::lora_linear", _lora_linear_backward, setup_context=_lora_linear_setup)


# A block's last linear runs as two functions so that activation checkpointing's recomputation
# stops before its base GEMM: non-reentrant checkpointing stops recomputing once every tensor saved
# for backward is back, and nothing after this layer's adapter saves one (the gated residual keeps
# its gate outside autograd's saved tensors). That skips the FFN's down-projection GEMM (3.4 TFLOP at
# 480x832x93) and the residual in every block's recomputation.
class _LoraHalfFunction(torch.autograd.Function):
    """s·(x Aᵀ) Bᵀ + b, saving what the adapter gradients need; its input gradient comes from
    `_BaseHalfFunction`, which adds it to the base one in a single GEMM. Both backward passes form
    s·(dy B) (a rank-sized GEMM over dy): recomputing it is cheaper than passing it between nodes."""

    @staticmethod
    def forward(ctx, x, bias, lora_a, lora_b, scaling: float):
        with torch.autocast(x.device.type, enabled=False):
            y, h = _lora_output(x, bias, lora_a, lora_b, scaling)
        ctx.save_for_backward(x, lora_a, lora_b, h)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, dy):
        x, lora_a, lora_b, h = ctx.saved_tensors
        with torch.autocast(dy.device.type, enabled=False):
            da, db = _adapter_grads(ctx.needs_input_grad[2], ctx.needs_input_grad[3], dy,
                                    _rank_grad(dy, lora_b, ctx.scaling), x, h, ctx.scaling)
        return None, None, da, db, None


class _BaseHalfFunction(torch.autograd.Function):
    """y += x Wᵀ in place, saving nothing through autograd's hooks (the frozen weight and the
    adapter matrices are kept as plain attributes); backward gives the whole input gradient."""

    @staticmethod
    def forward(ctx, y, x, weight, lora_a, lora_b, scaling: float):
        ctx.mark_dirty(y)
        with torch.autocast(x.device.type, enabled=False):
            y.addmm_(x.reshape(-1, x.shape[-1]), weight.t())
        ctx.weight, ctx.lora_a, ctx.lora_b = weight.detach(), lora_a.detach(), lora_b.detach()
        ctx.scaling, ctx.x_shape = scaling, x.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        with torch.autocast(dy.device.type, enabled=False):
            dh = _rank_grad(dy, ctx.lora_b, ctx.scaling)
            dx = _input_grad(dy, dh, ctx.weight, ctx.lora_a).view(ctx.x_shape)
        return dy, dx, None, None, None, None


class FusedLoraLinear(PeftLoraLinear):
    """`peft.tuners.lora.layer.Linear` whose forward takes `lora_linear` when it can."""

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
        x, scaling = x.to(dtype), float(self.scaling[name])
        # (not for a swapped block: holding its weight outside saved tensors would pin its GPU copy)
        if getattr(self.base_layer, "ends_block", False) and not getattr(self.base_layer, "weights_swapped", False):
            y = _LoraHalfFunction.apply(x, self.base_layer.bias, lora_a, lora_b, scaling)
            y = _BaseHalfFunction.apply(y, x, self.base_layer.weight, lora_a, lora_b, scaling)
        else:
            role = getattr(self.base_layer, "checkpoint_role", "")
            y, _ = lora_linear(x, self.base_layer.weight, self.base_layer.bias, lora_a, lora_b, scaling, role)
            if role:
                keep_on_host(y, role)  # acts only where checkpointing keeps this role, under activation offload
        return y.view(*x.shape[:-1], y.shape[-1])


def use_fused_lora_linears(model: nn.Module) -> int:
    """Swap every PEFT `lora.Linear` in `model` for `FusedLoraLinear` (same state, same parameters);
    returns how many were swapped."""
    swapped = 0
    for module in model.modules():
        if type(module) is PeftLoraLinear:
            module.__class__ = FusedLoraLinear
            swapped += 1
    return swapped
