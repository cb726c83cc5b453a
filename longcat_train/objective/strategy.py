"""Conditioning strategies: one object per mode owns which latent frames are clean, the per-frame
timesteps and the loss mask, so the training loop has no image-to-video branches.

`prepare(x0, noise, sigmas, start_latents) -> ModelBatch`; the loop feeds `ModelBatch` to the
transformer and takes `masked_flow_loss(prediction, batch)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .flow import noisy_latents, velocity_target


@dataclass
class ModelBatch:
    hidden_states: torch.Tensor  # [B, 16, T, H, W]
    timestep: torch.Tensor  # [B, T], σ·1000 per latent frame
    num_cond_latents: int
    target: torch.Tensor  # x0 − ε, [B, 16, T, H, W]
    frame_weights: torch.Tensor  # [T] 1 for frames in the loss, 0 for clean condition frames


def masked_flow_loss(prediction: torch.Tensor, batch: ModelBatch) -> torch.Tensor:
    """Mean squared error over the frames that carry noise (float32)."""
    weights = batch.frame_weights.to(prediction.device).view(1, 1, -1, 1, 1)
    sq = (prediction.float() - batch.target.float()).square() * weights
    per_frame = prediction[:, :, :1].numel()  # elements in one latent frame of the batch
    return sq.sum() / (weights.sum() * per_frame)


class TextToVideo:
    name = "t2v"
    num_cond_latents = 0

    def prepare(self, x0, noise, sigmas, start_latents=None) -> ModelBatch:
        B, _, T = x0.shape[:3]
        return ModelBatch(
            hidden_states=noisy_latents(x0, noise, sigmas),
            timestep=(sigmas * 1000).to(x0.device, torch.float32)[:, None].expand(B, T).clone(),
            num_cond_latents=0,
            target=velocity_target(x0, noise),
            frame_weights=torch.ones(T),
        )


class ImageToVideo:
    """The start image's latent goes in frame 0 with timestep 0 and `num_cond_latents=1`; that frame
    is clean, sees only itself in attention, gets no text and no loss."""

    name = "i2v"
    num_cond_latents = 1

    def prepare(self, x0, noise, sigmas, start_latents=None) -> ModelBatch:
        batch = TextToVideo().prepare(x0, noise, sigmas)
        c = self.num_cond_latents
        clean = x0[:, :, :c] if start_latents is None else start_latents[:, :, :c].to(x0)
        batch.hidden_states = torch.cat([clean, batch.hidden_states[:, :, c:]], dim=2)
        batch.timestep[:, :c] = 0
        batch.num_cond_latents = c
        batch.frame_weights[:c] = 0
        return batch


STRATEGIES = {"t2v": TextToVideo(), "i2v": ImageToVideo()}


def choose_strategy(i2v_probability: float, generator: torch.Generator):
    """One mode per batch (the forward shares `num_cond_latents` across the batch); at batch size 1
    this is the per-sample mix."""
    if i2v_probability >= 1.0:
        return STRATEGIES["i2v"]
    if i2v_probability <= 0.0:
        return STRATEGIES["t2v"]
    return STRATEGIES["i2v"] if torch.rand((), generator=generator).item() < i2v_probability else STRATEGIES["t2v"]
