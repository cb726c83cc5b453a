"""The official refinement stage (`generate_refine` of the LongCat-Video pipeline): a stage-1
render (480p, 15 fps) becomes a 720p video at 30 fps (15 fps with `spatial_only`).

The stage-1 frames are resized to the 720p size of their aspect ratio (`refine_size`), doubled in
time by linear interpolation, padded to whole block-sparse-attention blocks of latent frames,
encoded, noised to `t_thresh` and denoised along the truncated schedule (`denoise(...,
t_thresh=...)`: t_thresh·1000, then the 50-step schedule's timesteps below it) without CFG; the
caller applies the refinement LoRA and turns block-sparse attention on (`PreviewRenderer.refine`).
Condition frames (a start image, a continuation's given frames) stay clean, as in stage 1.

One difference from the official code, as in `render_video`: the VAE encodings are the posterior
mean, not a draw, and the noise comes from a seeded CPU generator, so a seed gives the same render
on every device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan

from longcat_train.release_facts import FLOW_SHIFT, REFINE_SIZES, VAE_TEMPORAL_STRIDE

from .denoise import denoise
from .render import RenderResult, decode_latents, encode_condition, initial_noise, to_uint8_frames

REFINE_T_THRESH = 0.5  # the official default: the stage-1 latents keep half their signal
REFINE_STEPS = 50  # the schedule the refinement's timesteps are taken from (official demos: 50)
# Block-sparse attention groups 4 latent frames per block: condition and noisy latents each fill whole blocks.
BSA_LATENT_GRANULARITY = 4
REFINED_FPS = 30  # the temporal 2x of the 15 fps stage 1


def refine_size(height: int, width: int) -> tuple[int, int]:
    """The 720p size (height, width) the official pipeline refines a `height`×`width` video to: the
    `REFINE_SIZES` entry whose labelled aspect ratio (height/width to two decimals) is nearest
    (the first of a tie)."""
    ratio = height / width
    return min(REFINE_SIZES, key=lambda size: abs(round(size[0] / size[1], 2) - ratio))


def upsample_frames(frames: np.ndarray, height: int, width: int, temporal: bool) -> torch.Tensor:
    """uint8 `[F, h, w, 3]` → `[3, F', height, width]` float32 in [-1, 1]: bilinear in space, then
    linear in time to F' = 2F frames (F with `temporal` False), corners aligned, as the official
    stage does."""
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    video = F.interpolate(video, size=(height, width), mode="bilinear", align_corners=True)
    video = video.permute(1, 0, 2, 3)[None] / 255.0
    count = 2 * len(frames) if temporal else len(frames)
    video = F.interpolate(video, size=(count, height, width), mode="trilinear", align_corners=True)
    return (video * 2 - 1)[0]


@dataclass(frozen=True)
class RefineLayout:
    """Where the frames sit in the refinement's latents: `front` copies of the first frame before
    the video and `back` copies of the last after it, so that the condition latents and the noisy
    latents each come to a multiple of `BSA_LATENT_GRANULARITY`."""

    num_cond_latents: int
    front: int
    back: int

    @classmethod
    def of(cls, num_frames: int, num_cond_frames: int) -> RefineLayout:
        stride, block = VAE_TEMPORAL_STRIDE, BSA_LATENT_GRANULARITY
        cond_latents = front = 0
        if num_cond_frames:
            cond_latents = block * math.ceil((1 + math.ceil((num_cond_frames - 1) / stride)) / block)
            front = 1 + (cond_latents - 1) * stride - num_cond_frames
        noise_frames = num_frames - num_cond_frames
        noise_latents = block * math.ceil(math.ceil(noise_frames / stride) / block)
        return cls(cond_latents, front, noise_latents * stride - noise_frames)

    def pad(self, pixels: torch.Tensor) -> torch.Tensor:
        """`[3, F, H, W]` with the first frame repeated `front` times before and the last `back` after."""
        return torch.cat([pixels[:, :1].expand(-1, self.front, -1, -1), pixels,
                          pixels[:, -1:].expand(-1, self.back, -1, -1)], dim=1)


def refinement_attention(transformer: torch.nn.Module):
    """Block-sparse self-attention while the block runs (the official `enable_bsa()`): `auto` with
    BSA enabled, so it holds on CUDA whatever dense kernel the run chose (a `sdpa` / `flash` run
    would otherwise stay dense), `auto`'s dense kernel for the rest; the run's setting comes back after."""
    return transformer.using_attention("auto", use_bsa=True)


def noised(latents: torch.Tensor, noise: torch.Tensor, t_thresh: float) -> torch.Tensor:
    """The refinement's starting point: the stage-1 latents mixed with noise at σ = t_thresh."""
    return (1 - t_thresh) * latents + t_thresh * noise


@torch.no_grad()
def refine_video(
    transformer: torch.nn.Module,
    vae: AutoencoderKLWan,
    prompt_embeds: torch.Tensor,
    prompt_mask: Optional[torch.Tensor],
    stage1_frames: np.ndarray,
    *,
    seed: int,
    condition_pixels: Optional[torch.Tensor] = None,
    spatial_only: bool = False,
    size: Optional[tuple[int, int]] = None,
    t_thresh: float = REFINE_T_THRESH,
    steps: int = REFINE_STEPS,
    shift: float = FLOW_SHIFT,
    tiling: bool = False,
    on_step: Optional[Callable[[int, int], None]] = None,
) -> RenderResult:
    """Refine uint8 `stage1_frames` `[F, h, w, 3]` to `size` (default `refine_size(h, w)`) and 2F
    frames (F with `spatial_only`). `condition_pixels` `[3, N, H, W]` in [-1, 1] at that size (a
    start image: N = 1) are kept clean as the first frames; their latents are the posterior mean of
    the last N frames with the first one repeated in front to whole BSA blocks. Text features as
    `render_video`'s; no CFG (the official stage runs none)."""
    height, width = size or refine_size(*stage1_frames.shape[1:3])
    vae.enable_tiling() if tiling else vae.disable_tiling()
    video = upsample_frames(stage1_frames, height, width, temporal=not spatial_only)
    num_cond = 0 if condition_pixels is None else condition_pixels.shape[1]
    if condition_pixels is not None and tuple(condition_pixels.shape) != (3, num_cond, height, width):
        raise ValueError(f"condition_pixels must be [3, N, {height}, {width}], got {list(condition_pixels.shape)}")
    layout = RefineLayout.of(video.shape[1], num_cond)
    latents = encode_condition(vae, layout.pad(video)).cpu()
    latents = noised(latents, initial_noise(tuple(latents.shape), seed), t_thresh)
    if condition_pixels is not None:
        cond_latents = encode_condition(vae, replace(layout, back=0).pad(condition_pixels.float()))
        latents[:, :, : layout.num_cond_latents] = cond_latents.cpu()
    device = next(transformer.parameters()).device
    mask = None if prompt_mask is None else prompt_mask.to(device)
    latents = denoise(
        transformer, latents.to(device), prompt_embeds.to(device), mask, None, None, steps, 1.0,
        num_cond_latents=layout.num_cond_latents, shift=shift, t_thresh=t_thresh, on_step=on_step,
    ).cpu()
    pixels = decode_latents(vae, latents)[:, layout.front : layout.front + video.shape[1]]
    return RenderResult(frames=to_uint8_frames(pixels), latents=latents, first_frame_psnr=None)
