"""Fused block ops (Triton) against the eager reference, forward and backward.

The kernels run in Triton's CPU interpreter, in one fresh subprocess (this file executed as a
script: TRITON_INTERPRET must be set before Triton is imported), at tiny sizes. In float32 the fused
ops equal the eager official numerics to ~1e-7; the interpreter rounds to bfloat16 differently from
the GPU, so bfloat16 is only held to bf16 tolerance here (the GPU check is tests/test_gpu_model_checks.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longcat_train.model import fused_ops

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def interpreter_errors() -> dict[str, list[float]]:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"kernel subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


OPS = ["modulate", "gated_residual", "layer_norm_affine", "rms_norm_rope", "rms_norm", "swiglu", "block_i2v"]


@pytest.mark.parametrize("op", OPS)
def test_fused_equals_eager_in_float32(interpreter_errors, op):
    errors = interpreter_errors[f"{op}/float32"]
    assert len(errors) >= 2  # output and at least one gradient were compared
    assert max(errors) <= 1e-6, errors


@pytest.mark.parametrize("op", OPS[:-1])
def test_fused_within_bf16_tolerance(interpreter_errors, op):
    assert max(interpreter_errors[f"{op}/bfloat16"]) <= 2e-2


def test_rms_norm_rope_keeps_token_major_layout(interpreter_errors):
    assert interpreter_errors["layouts"] == [1.0, 1.0, 1.0]


def test_cpu_without_interpreter_runs_eager_reference():
    x = torch.randn(1, 6, 8)
    shift, scale = torch.randn(1, 3, 1, 8), torch.randn(1, 3, 1, 8)
    assert torch.equal(fused_ops.modulate(x, shift, scale), fused_ops.modulate_eager(x, shift, scale))


def test_small_operands_needing_gradients_take_eager_path_with_their_gradients():
    x = torch.randn(1, 6, 8, requires_grad=True)
    gate = torch.randn(1, 3, 1, 8, requires_grad=True)
    fused_ops.gated_residual(x, torch.randn(1, 6, 8), gate).sum().backward()
    assert gate.grad is not None and gate.grad.abs().sum() > 0


def test_frames_must_divide_tokens():
    with pytest.raises(ValueError, match="latent frames"):
        fused_ops._row_geometry(torch.zeros(1, 7, 4), 3)


# ----- subprocess body ---------------------------------------------------------------------------
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _compare(fused, eager, inputs: list[tuple[torch.Tensor, bool]]) -> list[float]:
    """Relative L2 of the output and of every input gradient, fused vs eager."""
    results = []
    for fn in (fused, eager):
        xs = [t.detach().clone().requires_grad_(needs_grad) for t, needs_grad in inputs]
        y = fn(*xs)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype))
        results.append([y] + [x.grad for x in xs if x.requires_grad])
    return [_rel(a, b) for a, b in zip(*results)]


def _op_errors(dtype: torch.dtype) -> dict[str, list[float]]:
    from longcat_train.model import fused_ops as fo

    torch.manual_seed(0)
    B, T, per, C, H, D = 2, 3, 5, 64, 3, 16
    N = T * per
    x, y = torch.randn(B, N, C).to(dtype), torch.randn(B, N, C).to(dtype)
    shift, scale, gate = (torch.randn(B, T, 1, C) for _ in range(3))
    norm = torch.nn.LayerNorm(C, eps=1e-6).requires_grad_(False)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    qkv = torch.randn(B, N, 3, H, D).to(dtype)
    w = (1 + 0.3 * torch.randn(D)).to(dtype)
    angles = torch.rand(N, D // 2) * 6
    cos, sin = angles.cos(), angles.sin()
    a, b = torch.randn(B, N, 40).to(dtype), torch.randn(B, N, 40).to(dtype)
    name = str(dtype).removeprefix("torch.")
    return {
        f"modulate/{name}": _compare(fo.modulate, fo.modulate_eager, [(x, True), (shift, False), (scale, False)]),
        f"gated_residual/{name}": _compare(fo.gated_residual, fo.gated_residual_eager, [(x, True), (y, True), (gate, False)]),
        f"layer_norm_affine/{name}": _compare(lambda v: fo.layer_norm_affine(v, norm),
                                              lambda v: fo.layer_norm_affine_eager(v, norm), [(x, True)]),
        # a strided [B, heads, N, D] view of a qkv projection, as in self-attention
        f"rms_norm_rope/{name}": _compare(lambda v: fo.rms_norm_rope(_q_view(v), w, 1e-6, cos, sin),
                                          lambda v: fo.rope_eager(fo.rms_norm_eager(_q_view(v), w, 1e-6), cos, sin),
                                          [(qkv, True)]),
        f"rms_norm/{name}": _compare(lambda v: fo.rms_norm_rope(v, w, 1e-6), lambda v: fo.rms_norm_eager(v, w, 1e-6),
                                     [(qkv[:, :, 1], True)]),
        f"swiglu/{name}": _compare(fo.swiglu, fo.swiglu_eager, [(a, True), (b, True)]),
    }


def _q_view(qkv: torch.Tensor) -> torch.Tensor:
    """q of a [B, N, 3, heads, D] projection as a [B, heads, N, D] view (token-major storage)."""
    return qkv.unbind(2)[0].transpose(1, 2)


def _layouts() -> dict[str, list[float]]:
    """1.0 where the fused op's output and input gradient keep the input's layout: token-major for
    q/k sliced from a projection (so attention needs no transpose copy), contiguous otherwise."""
    from longcat_train.model import fused_ops as fo

    B, N, H, D = 1, 6, 3, 16
    w = torch.ones(D)
    angles = torch.rand(N, D // 2)
    qkv = torch.randn(B, N, 3, H, D, requires_grad=True)
    y = fo.rms_norm_rope(_q_view(qkv), w, 1e-6, angles.cos(), angles.sin())
    (y * torch.randn(y.shape).transpose(1, 2).contiguous().transpose(1, 2)).sum().backward()
    plain = fo.rms_norm_rope(torch.randn(B, N, H, D), w, 1e-6)
    return {"layouts": [float(y.shape == (B, H, N, D) and y.stride() == (N * H * D, D, H * D, 1)),
                        float(qkv.grad.abs().sum() > 0),
                        float(plain.is_contiguous())]}


def _block_errors() -> dict[str, list[float]]:
    """A tiny two-block transformer, I2V, selective checkpointing: fused kernels vs eager ops."""
    from longcat_train.model import LongCatVideoTransformer3DModel
    from longcat_train.model import fused_ops as fo

    torch.manual_seed(0)
    model = LongCatVideoTransformer3DModel(hidden_size=64, depth=2, num_heads=4, caption_channels=32,
                                           adaln_tembed_dim=32, frequency_embedding_size=32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.3 if p.ndim == 1 else 0.1)
    model.requires_grad_(False)
    model.blocks[1].attn.qkv.weight.requires_grad_(True)  # a trainable linear, like a LoRA target
    model.set_activation_checkpointing("selective")
    x = torch.randn(1, 16, 3, 4, 6)
    ts = torch.tensor([[0.0, 700.0, 700.0]])
    text = torch.randn(1, 1, 5, 32)

    def run(fusable) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        fo._fusable = fusable
        hidden = x.clone().requires_grad_(True)
        out = model(hidden, ts, text, None, num_cond_latents=1)
        out.pow(2).mean().backward()
        grads = [hidden.grad, model.blocks[1].attn.qkv.weight.grad.clone()]
        model.blocks[1].attn.qkv.weight.grad = None
        return [out], grads

    fused_out, fused_grads = run(fo._fusable)
    eager_out, eager_grads = run(lambda *args: False)
    return {"block_i2v/float32": [_rel(a, b) for a, b in zip(fused_out + fused_grads, eager_out + eager_grads)]}



def test_weights_that_require_grad_stop_the_kernels_only_where_autograd_runs(monkeypatch):
    """A render's model may keep trainable norm weights (a LoRA run's, a benchmark's): under no_grad
    nothing needs their gradient, so the fused kernels still run."""
    monkeypatch.setattr(fused_ops, "_interpreting", lambda: True)
    x, weight = torch.randn(2, 4), torch.ones(4, requires_grad=True)
    assert not fused_ops._fusable(x, weight)
    with torch.no_grad():
        assert fused_ops._fusable(x, weight)
    assert fused_ops._fusable(x, weight.detach())

if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    errors = _layouts() | _op_errors(torch.float32) | _op_errors(torch.bfloat16) | _block_errors()  # last: it swaps _fusable
    print(json.dumps(errors))
