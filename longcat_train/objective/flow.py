"""Flow matching as the released model expects it.

x_σ = (1 − σ)·x0 + σ·ε, the network sees timestep σ·1000 and predicts x0 − ε. σ is drawn per sample
and then shifted with the checkpoint scheduler's shift (12.0): σ' = 12σ / (1 + 11σ), the same
warp the sampler applies, so training spends its steps where inference does.
"""

from __future__ import annotations

import torch

from ..release_facts import FLOW_SHIFT

SIGMA_SCHEMES = ("logit_normal", "uniform")


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sample_sigmas(
    batch: int,
    generator: torch.Generator,
    scheme: str = "logit_normal",
    shift: float = FLOW_SHIFT,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> torch.Tensor:
    """Per-sample σ in (0, 1), float32, drawn on the CPU from `generator` (device-independent, so
    CPU and GPU runs with one seed train on the same σ)."""
    if scheme == "logit_normal":
        u = torch.sigmoid(torch.randn(batch, generator=generator) * logit_std + logit_mean)
    elif scheme == "uniform":
        u = torch.rand(batch, generator=generator)
    else:
        raise ValueError(f"sigma scheme {scheme!r}: choose one of {SIGMA_SCHEMES}")
    return shift_sigmas(u, shift)


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    s = sigmas.view(-1, *([1] * (x0.ndim - 1))).to(x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return x0 - noise
