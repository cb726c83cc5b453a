"""The released transformer's architecture with random weights, built on a device: what benchmarks,
the kernel warm-up, quantization probes and the release-shaped checkpoint writer share (the
architecture itself is in `release_facts`)."""

from __future__ import annotations

import torch

from ..release_facts import RELEASE_DIT_CONFIG
from .transformer import LongCatVideoTransformer3DModel

def random_transformer(device: str | torch.device, dtype: torch.dtype, depth: int = 48, seed: int = 0,
                       **overrides):
    """The release architecture (with `overrides` of its config keys) with random weights allocated
    directly on `device` in `dtype` (built on the meta device first, so host RAM never holds it;
    no global default dtype is touched, so a thread may build one while another loads a model)."""
    with torch.device("meta"):
        model = LongCatVideoTransformer3DModel.from_config({**RELEASE_DIT_CONFIG, "depth": depth, **overrides})
    # nn.Module's `to`: diffusers' override warns about float32-kept modules this model has none of
    model = torch.nn.Module.to(model, dtype).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("_norm.weight"):
                p.fill_(1.0)
            elif p.ndim == 1:
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model
