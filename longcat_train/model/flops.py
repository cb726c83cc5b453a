"""Model FLOPs of one LongCat-Video forward (and LoRA-training backward), for MFU.

Counted from the architecture, not measured, and without recomputation: activation checkpointing
costs extra work but is not useful work. Only matmul-class FLOPs are counted (2 per multiply-add);
norms, RoPE and elementwise ops are a few percent and left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..release_facts import TEXT_TOKENS

# dense bf16 peak without sparsity, per the vendors' datasheets (SXM parts)
DENSE_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "B200": 2250e12, "A100": 312e12}


def dense_bf16_peak_flops() -> float | None:
    """This GPU's dense bf16 peak (for MFU), or None when unknown or on the CPU."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in DENSE_BF16_PEAK.items() if k in name), None)


@dataclass(frozen=True)
class StepFlops:
    forward: float
    backward: float

    @property
    def total(self) -> float:
        return self.forward + self.backward


def _ffn_hidden(hidden: int, mlp_ratio: float, multiple_of: int = 256) -> int:
    h = int(2 * int(hidden * mlp_ratio) / 3)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


def transformer_flops(
    config: dict,
    batch: int,
    latent_frames: int,
    latent_height: int,
    latent_width: int,
    text_tokens: int = TEXT_TOKENS,
    num_cond_latents: int = 0,
    attention_density: float = 1.0,
) -> StepFlops:
    """FLOPs for `batch` samples of latent shape (T, H, W). `attention_density` < 1 models
    block-sparse self-attention (the fraction of key blocks kept).

    The backward of a LoRA step computes input gradients of the frozen linears (one matmul each,
    1x the forward) and all of attention's gradients (4 matmuls against 2: 2x the forward);
    LoRA's own weight gradients are negligible at rank ≤ 128 and not counted."""
    C = config["hidden_size"]
    depth = config["depth"]
    ph, pw = config["patch_size"][1], config["patch_size"][2]
    F = _ffn_hidden(C, config["mlp_ratio"])
    tokens_per_frame = (latent_height // ph) * (latent_width // pw)
    N = latent_frames * tokens_per_frame
    n_cond = num_cond_latents * tokens_per_frame
    n_noise = N - n_cond
    L = text_tokens

    linear_per_block = 2 * N * C * (3 * C + C)  # qkv + proj
    linear_per_block += 2 * n_noise * C * C * 2  # cross q + proj (condition tokens skip cross-attention)
    linear_per_block += 2 * L * C * 2 * C  # cross kv
    linear_per_block += 2 * N * C * F * 3  # SwiGLU
    # self-attention: condition tokens attend to condition tokens, noisy tokens to all
    attn_pairs = (n_cond * n_cond + n_noise * N) * attention_density
    attn_per_block = 4 * attn_pairs * C + 4 * n_noise * L * C  # QK^T and PV, self + cross

    in_out = 2 * N * C * config["in_channels"] * ph * pw + 2 * N * C * config["out_channels"] * ph * pw
    caption = 2 * L * C * (config["caption_channels"] + C)
    forward = batch * (depth * (linear_per_block + attn_per_block) + in_out + caption)
    backward = batch * (depth * (linear_per_block + 2 * attn_per_block) + in_out)
    return StepFlops(forward=float(forward), backward=float(backward))
