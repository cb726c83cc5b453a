"""The fp32 elementwise chains of a LongCat block, fused into single Triton passes.

Each op keeps the official numerics (the eager functions here are the reference and the CPU path):
LayerNorm, modulation, gated residuals, RMSNorm statistics and RoPE run in fp32 and are cast once at
the end, with the intermediate casts of the official code (RMSNorm's output rounded to the input
dtype before the weight multiplies it, RoPE's input read back from that dtype) reproduced in the
kernels. Eager PyTorch runs each chain as 5-10 memory-bound passes that also keep fp32 copies for
backward; a fused pass reads its bf16 input once and writes bf16 once, and the backward recomputes
the statistics instead of saving fp32 activations.

Hand-written kernels rather than torch.compile: compiling whole blocks broke under non-reentrant
checkpointing, and inductor does not reproduce the official intermediate bf16 roundings by default.

The fused path runs on CUDA (or under TRITON_INTERPRET=1, for tests) when the small operands
(modulation, gates, norm weights) need no gradient — true for LoRA training, where they come from
frozen layers. Otherwise the eager reference runs, so gradients are always complete.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (macOS, Windows): the eager reference runs
    triton = None


def _interpreting() -> bool:
    if triton is None:
        return False
    try:
        from triton import knobs  # Triton >= 3.4
    except ImportError:
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return bool(knobs.runtime.interpret)


_enabled = True


def use_fused_kernels(enabled: bool) -> None:
    """Switch the fused kernels off (eager reference everywhere), e.g. to measure what they save."""
    global _enabled
    _enabled = enabled


def _fusable(x: torch.Tensor, *small: torch.Tensor | None) -> bool:
    if not _enabled or triton is None or not (x.is_cuda or _interpreting()):
        return False
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    # the kernels give no gradient for these small operands (norm weights, affine parameters); where
    # autograd would want one, take the eager path (under no_grad, as in renders, nothing needs it)
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in small))


# ----- eager reference (the official numerics) -------------------------------------------------
def modulate_eager(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm (fp32, no affine) of x [B, N, C], then ×(1 + scale) + shift per latent frame
    (shift/scale [B, T, 1, C] fp32), cast back to x's dtype."""
    B, N, C = x.shape
    T = shift.shape[1]
    h = F.layer_norm(x.float().view(B, T, -1, C), (C,), eps=eps)
    return (h * (1 + scale) + shift).to(x.dtype).view(B, N, C)


def layer_norm_affine_eager(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    """LayerNorm with its weight and bias in fp32, cast back to x's dtype."""
    out = F.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps)
    return out.to(x.dtype)


def gated_residual_eager(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + gate·y in fp32 (gate [B, T, 1, C] per latent frame), cast back to x's dtype."""
    B, N, C = x.shape
    T = gate.shape[1]
    return (x.view(B, T, -1, C) + gate * y.view(B, T, -1, C)).to(x.dtype).view(B, N, C)


def rms_norm_eager(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in fp32, cast back, multiply the weight in the input dtype."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * weight


def rope_eager(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Adjacent-pair rotation in fp32 of x [B, heads, N, D] by angles cos/sin [N, D/2]."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)
    return out.flatten(-2).type_as(x)


def swiglu_eager(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.silu(a) * b


# ----- kernels ---------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _token_program(C, tokens, tokens_per_row, params_per_batch, BLOCK_C: tl.constexpr):
        """(token row, its (batch, latent frame) parameter row, columns, column mask) of a program
        that handles one token: per-frame parameters (modulation, gates) are indexed by p."""
        row = tl.program_id(0)
        p = (row // tokens) * params_per_batch + (row % tokens) // tokens_per_row
        cols = tl.arange(0, BLOCK_C)
        return row, p, cols, cols < C

    @triton.jit
    def _ln_row_stats(X, row, C, cols, mask, eps):
        """(x − mean, 1/std) of one token's row in fp32: backward recomputes them, not saves them."""
        x = tl.load(X + row * C + cols, mask=mask, other=0.0).to(tl.float32)
        xc = tl.where(mask, x - tl.sum(x, axis=0) / C, 0.0)
        return xc, 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / C + eps)

    @triton.jit
    def _ln_scale_shift_fwd(X, A, Bias, Y, C, tokens, tokens_per_row, params_per_batch, eps,
                            BLOCK_C: tl.constexpr):
        row, p, cols, mask = _token_program(C, tokens, tokens_per_row, params_per_batch, BLOCK_C)
        xc, rstd = _ln_row_stats(X, row, C, cols, mask, eps)
        a = tl.load(A + p * C + cols, mask=mask, other=0.0)
        b = tl.load(Bias + p * C + cols, mask=mask, other=0.0)
        y = (xc * rstd) * a + b
        tl.store(Y + row * C + cols, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _ln_scale_shift_bwd(X, A, DY, DX, C, tokens, tokens_per_row, params_per_batch, eps,
                            BLOCK_C: tl.constexpr):
        row, p, cols, mask = _token_program(C, tokens, tokens_per_row, params_per_batch, BLOCK_C)
        xc, rstd = _ln_row_stats(X, row, C, cols, mask, eps)
        xhat = xc * rstd
        a = tl.load(A + p * C + cols, mask=mask, other=0.0)
        g = tl.load(DY + row * C + cols, mask=mask, other=0.0).to(tl.float32) * a
        c1 = tl.sum(xhat * g, axis=0) / C
        c2 = tl.sum(g, axis=0) / C
        dx = (g - (xhat * c1 + c2)) * rstd
        tl.store(DX + row * C + cols, dx.to(DX.dtype.element_ty), mask=mask)

    @triton.jit
    def _gate_kernel(X, Y, G, OUT, C, tokens, tokens_per_row, params_per_batch,
                     HAS_X: tl.constexpr, BLOCK_C: tl.constexpr):
        # OUT = X + G·Y (or G·Y), in fp32, one token per program
        row, p, cols, mask = _token_program(C, tokens, tokens_per_row, params_per_batch, BLOCK_C)
        out = tl.load(G + p * C + cols, mask=mask, other=0.0) * tl.load(Y + row * C + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_X:
            out = tl.load(X + row * C + cols, mask=mask, other=0.0).to(tl.float32) + out
        tl.store(OUT + row * C + cols, out.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _head_rows(rows, heads, tokens, BLOCK_R: tl.constexpr, TOKEN_MAJOR: tl.constexpr):
        """(token index n, batch·head index bh, row mask [BLOCK_R, 1]) of this program's rows of a
        [B, heads, N, D] tensor. Rows are taken in storage order, so a program reads one contiguous
        span: heads fastest for token-major storage (one token's heads lie side by side), tokens
        fastest otherwise."""
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        if TOKEN_MAJOR:
            per_batch = heads * tokens
            return (r % per_batch) // heads, (r // per_batch) * heads + r % heads, (r < rows)[:, None]
        return r % tokens, r // tokens, (r < rows)[:, None]

    @triton.jit
    def _row_offsets(bh, n, heads, stride_b, stride_h, stride_n):
        return (bh // heads) * stride_b + (bh % heads) * stride_h + n * stride_n

    @triton.jit
    def _rotate_pairs(y, COS, SIN, n, m2, BLOCK_R: tl.constexpr, D: tl.constexpr, INVERSE: tl.constexpr):
        """RoPE on adjacent pairs of y's rows, by +angle (or −angle when INVERSE, for the gradient)."""
        j = tl.arange(0, D // 2)
        c = tl.load(COS + n[:, None] * (D // 2) + j[None, :], mask=m2, other=0.0)
        s = tl.load(SIN + n[:, None] * (D // 2) + j[None, :], mask=m2, other=0.0)
        if INVERSE:
            s = -s
        y0, y1 = tl.split(tl.reshape(y, (BLOCK_R, D // 2, 2)))
        return tl.reshape(tl.join(y0 * c - y1 * s, y1 * c + y0 * s), (BLOCK_R, D))

    @triton.jit
    def _rms_rope_fwd(X, W, COS, SIN, Y, rows, heads, tokens, s_b, s_h, s_n, o_b, o_h, o_n, eps,
                      D: tl.constexpr, HAS_ROPE: tl.constexpr, BLOCK_R: tl.constexpr, TOKEN_MAJOR: tl.constexpr):
        # rows of X [B, heads, N, D] → Y (each with its own strides, unit stride on D). Rows are
        # read and written whole (vectorised); RoPE's adjacent pairs are split apart in registers
        n, bh, m2 = _head_rows(rows, heads, tokens, BLOCK_R, TOKEN_MAJOR)
        d = tl.arange(0, D)
        x = tl.load(X + _row_offsets(bh, n, heads, s_b, s_h, s_n)[:, None] + d[None, :], mask=m2, other=0.0)
        x = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
        w = tl.load(W + d).to(tl.float32)
        dt = Y.dtype.element_ty
        y = ((x * rstd[:, None]).to(dt).to(tl.float32) * w[None, :]).to(dt).to(tl.float32)
        if HAS_ROPE:
            y = _rotate_pairs(y, COS, SIN, n, m2, BLOCK_R, D, False)
        tl.store(Y + _row_offsets(bh, n, heads, o_b, o_h, o_n)[:, None] + d[None, :], y.to(dt), mask=m2)

    @triton.jit
    def _rms_rope_bwd(X, W, COS, SIN, DY, DX, rows, heads, tokens, s_b, s_h, s_n, g_b, g_h, g_n,
                      o_b, o_h, o_n, eps,
                      D: tl.constexpr, HAS_ROPE: tl.constexpr, BLOCK_R: tl.constexpr, TOKEN_MAJOR: tl.constexpr):
        n, bh, m2 = _head_rows(rows, heads, tokens, BLOCK_R, TOKEN_MAJOR)
        d = tl.arange(0, D)
        dt = DX.dtype.element_ty
        g = tl.load(DY + _row_offsets(bh, n, heads, g_b, g_h, g_n)[:, None] + d[None, :], mask=m2, other=0.0)
        g = g.to(tl.float32)
        if HAS_ROPE:
            g = _rotate_pairs(g, COS, SIN, n, m2, BLOCK_R, D, True)
        # the eager graph rounds the gradient to the input dtype at each cast and bf16 multiply
        w = tl.load(W + d).to(tl.float32)
        dn = (g.to(dt).to(tl.float32) * w[None, :]).to(dt).to(tl.float32)
        x = tl.load(X + _row_offsets(bh, n, heads, s_b, s_h, s_n)[:, None] + d[None, :], mask=m2, other=0.0)
        x = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
        h = x * rstd[:, None]
        dot = tl.sum(dn * h, axis=1) / D
        dx = (dn - h * dot[:, None]) * rstd[:, None]
        tl.store(DX + _row_offsets(bh, n, heads, o_b, o_h, o_n)[:, None] + d[None, :], dx.to(dt), mask=m2)

    @triton.jit
    def _swiglu_fwd(A, B, OUT, numel, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < numel
        dt = OUT.dtype.element_ty
        a = tl.load(A + i, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + i, mask=mask, other=0.0).to(tl.float32)
        s = (a / (1.0 + tl.exp(-a))).to(dt).to(tl.float32)
        tl.store(OUT + i, (s * b).to(dt), mask=mask)

    @triton.jit
    def _swiglu_bwd(A, B, G, DA, DB, numel, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < numel
        dt = DA.dtype.element_ty
        a = tl.load(A + i, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + i, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + i, mask=mask, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-a))
        s = (a * sig).to(dt).to(tl.float32)
        ds = (g * b).to(dt).to(tl.float32)
        tl.store(DB + i, (g * s).to(dt), mask=mask)
        tl.store(DA + i, (ds * sig * (1.0 + a * (1.0 - sig))).to(dt), mask=mask)


def _row_geometry(x: torch.Tensor, param_rows: int) -> tuple[int, int, int]:
    """(tokens per batch, tokens per parameter row, parameter rows per batch) for [B, N, C]."""
    N = x.shape[1]
    if N % param_rows:
        raise ValueError(f"{N} tokens do not split into {param_rows} latent frames")
    return N, N // param_rows, param_rows


class _LayerNormScaleShift(torch.autograd.Function):
    """y = LayerNorm(x) · a + b per (batch, frame) row of a/b [B, T, C] fp32, cast to x's dtype."""

    @staticmethod
    def forward(ctx, x, a, b, eps):
        x = x.contiguous()
        B, N, C = x.shape
        geometry = _row_geometry(x, a.shape[1])
        y = torch.empty_like(x)
        _ln_scale_shift_fwd[(B * N,)](x, a, b, y, C, *geometry, eps,
                                      BLOCK_C=triton.next_power_of_2(C), num_warps=8)
        ctx.save_for_backward(x, a)
        ctx.geometry, ctx.eps = geometry, eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x, a = ctx.saved_tensors
        B, N, C = x.shape
        dx = torch.empty_like(x)
        _ln_scale_shift_bwd[(B * N,)](x, a, dy.contiguous(), dx, C, *ctx.geometry, ctx.eps,
                                      BLOCK_C=triton.next_power_of_2(C), num_warps=8)
        return dx, None, None, None


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, gate):
        x, y = x.contiguous(), y.contiguous()
        B, N, C = x.shape
        geometry = _row_geometry(x, gate.shape[1])
        out = torch.empty_like(x)
        _gate_kernel[(B * N,)](x, y, gate, out, C, *geometry, HAS_X=True,
                               BLOCK_C=triton.next_power_of_2(C), num_warps=8)
        # A plain attribute, not a saved tensor: the block's recomputation under activation
        # checkpointing can then stop before the last linear and this residual (see
        # `lora.fused_linear`). The gate is a small modulation tensor that never needs a gradient here.
        ctx.gate = gate.detach()
        ctx.geometry, ctx.dtypes = geometry, (x.dtype, y.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        gate = ctx.gate
        dout = dout.contiguous()
        B, N, C = dout.shape
        dy = torch.empty(dout.shape, dtype=ctx.dtypes[1], device=dout.device)
        _gate_kernel[(B * N,)](dout, dout, gate, dy, C, *ctx.geometry, HAS_X=False,
                               BLOCK_C=triton.next_power_of_2(C), num_warps=8)
        return dout.to(ctx.dtypes[0]), dy, None


_RMS_ROWS = 16


def _dense_like(x: torch.Tensor) -> torch.Tensor:
    """An empty dense tensor shaped like x [B, P, Q, D] whose dims 1 and 2 keep x's stride order
    (as cuDNN attention allocates its output): q/k sliced from a [B, N, 3, H, D] projection stay
    token-major, so attention's output and gradients need no transpose copies."""
    B, P, Q, D = x.shape
    if _token_major(x):
        return x.new_empty((B, Q, P, D)).transpose(1, 2)
    return x.new_empty((B, P, Q, D))


def _token_major(x: torch.Tensor) -> bool:
    """Whether [B, heads, N, D] x keeps a token's heads closer together than a head's tokens."""
    return x.stride(1) < x.stride(2)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


class _RmsNormRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, cos, sin, eps):
        B, H, N, D = x.shape
        y = _dense_like(x)
        has_rope = cos is not None
        rows = B * H * N
        _rms_rope_fwd[(triton.cdiv(rows, _RMS_ROWS),)](
            x, weight, cos if has_rope else weight, sin if has_rope else weight, y, rows, H, N,
            *_strides(x), *_strides(y), eps, D=D, HAS_ROPE=has_rope, BLOCK_R=_RMS_ROWS,
            TOKEN_MAJOR=_token_major(x), num_warps=4)
        ctx.save_for_backward(x, weight, cos, sin)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, cos, sin = ctx.saved_tensors
        B, H, N, D = x.shape
        dx = _dense_like(x)
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        has_rope = cos is not None
        rows = B * H * N
        _rms_rope_bwd[(triton.cdiv(rows, _RMS_ROWS),)](
            x, weight, cos if has_rope else weight, sin if has_rope else weight, dy, dx,
            rows, H, N, *_strides(x), *_strides(dy), *_strides(dx), ctx.eps,
            D=D, HAS_ROPE=has_rope, BLOCK_R=_RMS_ROWS, TOKEN_MAJOR=_token_major(x), num_warps=4)
        return dx, None, None, None, None


_SWIGLU_BLOCK = 2048


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        a, b = a.contiguous(), b.contiguous()
        out = torch.empty_like(a)
        _swiglu_fwd[(triton.cdiv(a.numel(), _SWIGLU_BLOCK),)](a, b, out, a.numel(), BLOCK=_SWIGLU_BLOCK)
        ctx.save_for_backward(a, b)
        return out

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        da, db = torch.empty_like(a), torch.empty_like(b)
        _swiglu_bwd[(triton.cdiv(a.numel(), _SWIGLU_BLOCK),)](a, b, g.contiguous(), da, db, a.numel(),
                                                               BLOCK=_SWIGLU_BLOCK)
        return da, db


# ----- public ops: fused where possible, else the eager reference ------------------------------
def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`modulate_eager`, fused. x [B, N, C]; shift/scale [B, T, 1, C] fp32."""
    if not _fusable(x, shift, scale):
        return modulate_eager(x, shift, scale, eps)
    a = (1 + scale).squeeze(2).contiguous()  # the eager code forms (1 + scale) in fp32 first, too
    return _LayerNormScaleShift.apply(x, a, shift.squeeze(2).contiguous(), eps)


def layer_norm_affine(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    """`layer_norm_affine_eager`, fused. x [B, N, C]."""
    if not _fusable(x, norm.weight, norm.bias) or x.ndim != 3:
        return layer_norm_affine_eager(x, norm)
    B = x.shape[0]
    a = norm.weight.float().expand(B, 1, -1).contiguous()
    b = norm.bias.float().expand(B, 1, -1).contiguous()
    return _LayerNormScaleShift.apply(x, a, b, norm.eps)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """`gated_residual_eager`, fused. x, y [B, N, C]; gate [B, T, 1, C] fp32."""
    if not _fusable(x, gate) or gate.dtype != torch.float32:
        return gated_residual_eager(x, y, gate)
    return _GatedResidual.apply(x, y, gate.squeeze(2).contiguous())


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float,
                  cos: torch.Tensor | None = None, sin: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm over the last dim of x [B, heads, N, D], then (given cos/sin [N, D/2] fp32) RoPE;
    returns `rope_eager(rms_norm_eager(x))`, dense, with dims 1 and 2 in x's stride order."""
    fusable = (_fusable(x, weight) and weight.dtype == x.dtype and x.ndim == 4 and x.stride(-1) == 1
               and x.shape[-1] % 2 == 0 and (x.shape[-1] & (x.shape[-1] - 1)) == 0)
    if not fusable:
        out = rms_norm_eager(x, weight, eps)
        return out if cos is None else rope_eager(out, cos, sin)
    if cos is not None:
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
    return _RmsNormRope.apply(x, weight, cos, sin, eps)


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) · b in the inputs' dtype (each op rounded as in eager PyTorch)."""
    if not _fusable(a) or a.dtype != b.dtype or a.shape != b.shape:
        return swiglu_eager(a, b)
    return _SwiGLU.apply(a, b)
