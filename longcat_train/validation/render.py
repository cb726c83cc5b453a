"""One render: start image → VAE latent → `denoise` → VAE decode → uint8 frames.

Shared by periodic validation and `longcat validate`. The initial noise comes from a CPU
generator, so a seed gives the same render on any device.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from PIL import Image

from longcat_train.model.step_cache import StepCache
from longcat_train.components import denormalize_latents, normalize_latents, vae_latent_stats
from longcat_train.release_facts import FLOW_SHIFT, LATENT_CHANNELS
from longcat_train.config import TrainingConfig

from .denoise import denoise

# Image-to-video conditions on exactly one clean latent frame, the start image's.
I2V_COND_LATENTS = 1


@dataclass(frozen=True)
class RenderSettings:
    """The keyword arguments of `render_video` that stay fixed across one set of renders."""

    height: int
    width: int
    num_frames: int
    steps: int
    guidance: float
    seed: int
    distilled: bool = False
    shift: float = FLOW_SHIFT
    tiling: bool = False
    # opt-in, approximate: skip the later blocks at steps whose first block barely moved (`StepCache`)
    step_cache: float = 0.0

    @classmethod
    def from_training(cls, training: TrainingConfig, shift: float = FLOW_SHIFT) -> RenderSettings:
        """The `validation_*` keys (seed: `validation_seed`, else `seed`; tiling: `vae_enable_tiling`)."""
        height, width = training.validation_size
        seed = training.seed if training.validation_seed is None else training.validation_seed
        return cls(height, width, training.validation_num_video_frames, training.validation_num_inference_steps,
                   training.validation_guidance, seed, shift=shift, tiling=training.vae_enable_tiling,
                   step_cache=training.validation_step_cache)

    def sized(self, height: int, width: int) -> RenderSettings:
        """These settings at another size (a render that follows its clip's orientation)."""
        return replace(self, height=height, width=width)

    def as_kwargs(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class RenderResult:
    frames: np.ndarray  # uint8 [F, H, W, 3]
    latents: torch.Tensor  # denoised, normalised [1, 16, T_lat, H/8, W/8] float32 on the CPU
    first_frame_psnr: float | None  # decoded frame 0 vs the start image (dB); None for text-to-video
    skipped_steps: int = 0  # sampler steps the step cache answered without the later blocks


def fit_pixels(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize `[3, F, h, w]` to cover `height`×`width` and centre-crop it there."""
    h, w = pixels.shape[-2:]
    if (h, w) == (height, width):
        return pixels
    scale = max(height / h, width / w)
    size = (max(height, math.ceil(h * scale)), max(width, math.ceil(w * scale)))
    frames = pixels.permute(1, 0, 2, 3)  # interpolate wants [N, C, h, w]
    frames = F.interpolate(frames.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return frames[:, :, top : top + height, left : left + width].permute(1, 0, 2, 3).clamp(-1, 1).contiguous()


def load_start_image(path: Path, height: int, width: int) -> torch.Tensor:
    """An image file as `[3, 1, height, width]` float32 in [-1, 1] (cover-resized, centre-cropped)."""
    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read start image {path}: {error}. Fix: give a PNG or JPEG file.") from error
    pixels = torch.from_numpy(rgb).permute(2, 0, 1)[:, None] / 127.5 - 1.0
    return fit_pixels(pixels, height, width)


def _vae_factors(vae: AutoencoderKLWan) -> tuple[int, int]:
    return int(vae.config.scale_factor_temporal), int(vae.config.scale_factor_spatial)


def latent_shape(vae: AutoencoderKLWan, height: int, width: int, num_frames: int) -> tuple[int, ...]:
    """`[1, 16, T_lat, H/8, W/8]` of a render, with the size rules checked and named."""
    temporal, spatial = _vae_factors(vae)
    if (num_frames - 1) % temporal:
        raise ValueError(f"{num_frames} frames: renders need 1 + {temporal}·k frames (e.g. 93)")
    # The DiT patchifies latents 2×2, so pixels must be multiples of 2·spatial.
    if height % (2 * spatial) or width % (2 * spatial):
        raise ValueError(f"render size {height}x{width}: height and width must be multiples of {2 * spatial}")
    return (1, LATENT_CHANNELS, (num_frames - 1) // temporal + 1, height // spatial, width // spatial)


def _vae_place(vae: AutoencoderKLWan) -> tuple[torch.device, torch.dtype]:
    parameter = next(vae.parameters())
    return parameter.device, parameter.dtype


@torch.no_grad()
def encode_condition(vae: AutoencoderKLWan, pixels: torch.Tensor) -> torch.Tensor:
    """The normalised latents `[1, 16, 1 + (F − 1) // 4, H/8, W/8]` float32 of condition frames
    `[3, F, H, W]` (a start image: F = 1): the posterior mean (its argmax), so a seed's render does
    not depend on an encoder draw."""
    device, dtype = _vae_place(vae)
    posterior = vae.encode(pixels[None].to(device=device, dtype=dtype)).latent_dist
    mean, std = vae_latent_stats(vae)
    return normalize_latents(posterior.mode().float(), mean, std)


@torch.no_grad()
def decode_latents(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents `[1, 16, T, h, w]` → pixels `[3, F, H, W]` float32 in [-1, 1] on the CPU."""
    device, dtype = _vae_place(vae)
    mean, std = vae_latent_stats(vae)
    z = denormalize_latents(latents.to(device=device, dtype=torch.float32), mean, std)
    video = vae.decode(z.to(dtype), return_dict=False)[0]
    return video[0].float().clamp(-1, 1).cpu()


def to_uint8_frames(pixels: torch.Tensor) -> np.ndarray:
    """`[3, F, H, W]` in [-1, 1] → uint8 `[F, H, W, 3]`."""
    scaled = ((pixels.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return scaled.permute(1, 2, 3, 0).contiguous().numpy()


def psnr(reference: torch.Tensor, image: torch.Tensor) -> float:
    """Peak signal-to-noise ratio (dB) of two images in [-1, 1], measured on the [0, 1] scale."""
    mse = ((reference.float().cpu() - image.float().cpu()) / 2).square().mean().item()
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def _check_condition_frames(vae: AutoencoderKLWan, frames: torch.Tensor, height: int, width: int,
                            num_frames: int) -> None:
    temporal = _vae_factors(vae)[0]
    count = frames.shape[1] if frames.ndim == 4 else 0
    if tuple(frames.shape) != (3, count, height, width) or (count - 1) % temporal:
        raise ValueError(f"condition_frames must be [3, 1 + {temporal}·k, {height}, {width}], got {list(frames.shape)}")
    if count >= num_frames:
        raise ValueError(f"{count} condition frames leave no new frame in a render of {num_frames} frames")


def initial_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Gaussian noise drawn on the CPU so a seed means the same render on every device."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


@torch.no_grad()
def render_video(
    transformer: torch.nn.Module,
    vae: AutoencoderKLWan,
    prompt_embeds: torch.Tensor,
    prompt_mask: Optional[torch.Tensor],
    negative_embeds: Optional[torch.Tensor],
    negative_mask: Optional[torch.Tensor],
    *,
    height: int,
    width: int,
    num_frames: int,
    steps: int,
    guidance: float,
    seed: int,
    start_pixels: Optional[torch.Tensor] = None,
    condition_frames: Optional[torch.Tensor] = None,
    distilled: bool = False,
    shift: float = FLOW_SHIFT,
    tiling: bool = False,
    step_cache: float = 0.0,
    on_step: Optional[Callable[[int, int], None]] = None,
) -> RenderResult:
    """Render one video. Text features are `[1, 1, L, C]` / `[1, L]` (pad to 512 with
    `collate_text(..., max_len=TEXT_TOKENS)` to match the release). `start_pixels` `[3, 1, H, W]` in [-1, 1]
    makes it image-to-video (its latent is frame 0, never changed); `condition_frames` `[3, N, H, W]`
    (N = 1 + 4k < num_frames) a video continuation, sampled as the official `generate_vc`, whose
    first N frames are these; neither makes it text-to-video.
    `tiling` decodes (and encodes) with the VAE in tiles, for large renders."""
    shape = latent_shape(vae, height, width, num_frames)
    vae.enable_tiling() if tiling else vae.disable_tiling()
    device = next(transformer.parameters()).device
    latents = initial_noise(shape, seed)
    num_cond = 0
    if start_pixels is not None and condition_frames is not None:
        raise ValueError("give start_pixels (image-to-video) or condition_frames (continuation), not both")
    if start_pixels is not None:
        if tuple(start_pixels.shape) != (3, 1, height, width):
            raise ValueError(f"start_pixels must be [3, 1, {height}, {width}], got {list(start_pixels.shape)}")
        latents[:, :, :I2V_COND_LATENTS] = encode_condition(vae, start_pixels).cpu()
        num_cond = I2V_COND_LATENTS
    if condition_frames is not None:
        _check_condition_frames(vae, condition_frames, height, width, num_frames)
        cond_latents = encode_condition(vae, condition_frames).cpu()
        num_cond = cond_latents.shape[2]
        latents[:, :, :num_cond] = cond_latents

    def place(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if tensor is None else tensor.to(device)

    cache = StepCache(step_cache) if step_cache else None
    latents = denoise(
        transformer, latents.to(device), place(prompt_embeds), place(prompt_mask),
        place(negative_embeds), place(negative_mask), steps, guidance,
        num_cond_latents=num_cond, shift=shift, distilled=distilled, continuation=condition_frames is not None,
        on_step=on_step, step_cache=cache,
    ).cpu()
    pixels = decode_latents(vae, latents)
    if condition_frames is not None:  # the given frames, then the new ones (as the official demo writes it)
        pixels[:, : condition_frames.shape[1]] = condition_frames.float()
    fidelity = None if start_pixels is None else psnr(start_pixels[:, 0], pixels[:, 0])
    return RenderResult(frames=to_uint8_frames(pixels), latents=latents, first_frame_psnr=fidelity,
                        skipped_steps=cache.skipped if cache else 0)
