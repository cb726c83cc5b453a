"""Conditioning strategies: one object per mode owns which latent frames are clean, the per-frame
timesteps and the loss mask, which data its clean frames come from and which items take it, so
the training loop, the held-out loss and the warm-up have no image-to-video branches: a new mode
is its class and its row in `STRATEGIES`.

`prepare(x0, noise, sigmas, start_latents) -> ModelBatch`; the loop feeds `ModelBatch` to the
transformer and takes `masked_flow_loss(prediction, batch)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.items import ClipItem
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
    """No clean frame: the default mode, for every batch no other mode is drawn for."""

    name = "t2v"
    num_cond_latents = 0
    start_frames = False  # needs nothing beyond the clip and its caption

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
    # its clean frame is the start-frame image's cached latent (a conditioning dataset's), where
    # the item has one; else the clip's own first frame
    start_frames = True

    def takes(self, item: ClipItem) -> bool:
        return item.is_i2v  # a dataset marked image-to-video

    def probability(self, item: ClipItem) -> float:
        """How often a batch of `item` is trained in this mode (its dataset's setting)."""
        return item.i2v_probability

    def prepare(self, x0, noise, sigmas, start_latents=None) -> ModelBatch:
        batch = TextToVideo().prepare(x0, noise, sigmas)
        c = self.num_cond_latents
        clean = x0[:, :, :c] if start_latents is None else start_latents[:, :, :c].to(x0)
        batch.hidden_states = torch.cat([clean, batch.hidden_states[:, :, c:]], dim=2)
        batch.timestep[:, :c] = 0
        batch.num_cond_latents = c
        batch.frame_weights[:c] = 0
        return batch


# Every mode, the default first. The others (conditioned) each have `takes(item)` (whether an item
# can be trained in it, from its dataset) and `probability(item)` (how often, where it can).
STRATEGIES = {"t2v": TextToVideo(), "i2v": ImageToVideo()}
DEFAULT_STRATEGY, *CONDITIONED_STRATEGIES = STRATEGIES.values()


def choose_strategy(items: list[ClipItem], generator: torch.Generator):
    """One mode per batch (the forward shares `num_cond_latents` across the batch): each conditioned
    mode with its items' mean probability (0 for an item it does not take), the default the rest; at
    batch size 1 this is the per-sample mix. One draw from `generator`, none when the mode is certain."""
    shares = [(strategy, sum(strategy.probability(i) if strategy.takes(i) else 0.0 for i in items) / len(items))
              for strategy in CONDITIONED_STRATEGIES]
    shares = [(strategy, share) for strategy, share in shares if share > 0.0]
    if not shares:
        return DEFAULT_STRATEGY
    if len(shares) == 1 and shares[0][1] >= 1.0:
        return shares[0][0]
    draw = torch.rand((), generator=generator).item()
    for strategy, share in shares:
        if draw < share:
            return strategy
        draw -= share
    return DEFAULT_STRATEGY


def fixed_strategy(item: ClipItem, latent_frames: int):
    """The mode of an item's held-out loss (no draw: the same inputs every validation): the first
    conditioned mode it takes that leaves a noisy frame of its `latent_frames`, else the default."""
    for strategy in CONDITIONED_STRATEGIES:
        if strategy.takes(item) and latent_frames > strategy.num_cond_latents:
            return strategy
    return DEFAULT_STRATEGY


def drawn_strategy(items: list[ClipItem]):
    """The first conditioned mode some item may be drawn in, else the default: the mode whose
    kernels the warm-up sets up."""
    for strategy in CONDITIONED_STRATEGIES:
        if any(strategy.takes(i) and strategy.probability(i) > 0 for i in items):
            return strategy
    return DEFAULT_STRATEGY
