"""One batch's loss, from cached latents to a scalar: the path `train`, `bench` and the held-out loss share."""

from __future__ import annotations

import torch

from .strategy import ModelBatch, masked_flow_loss


def flow_matching_loss(
    transformer: torch.nn.Module,
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    text_embeds: torch.Tensor,
    text_mask: torch.Tensor | None,
    strategy,
    start_latents: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ModelBatch]:
    """x0 and noise [B,16,T,H,W] (fp32), sigmas [B] already shifted; returns (loss, model batch)."""
    batch = strategy.prepare(x0, noise, sigmas.to(x0.device), start_latents)
    prediction = transformer(
        batch.hidden_states,
        batch.timestep,
        text_embeds,
        text_mask,
        num_cond_latents=batch.num_cond_latents,
    )
    return masked_flow_loss(prediction, batch), batch
