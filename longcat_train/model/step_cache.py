"""Step caching for renders (opt-in, approximate): skip the DiT's later blocks at sampler steps where
the first block's output barely moved since the last fully computed step, and add the residual
the later blocks produced then (the "first-block cache" idea, as in ParaAttention's FBCache).

Written here rather than taken from a library because it has to sit inside our block loop (with
cached condition frames, LoRA hooks and block swap); it is a few lines. No calibration per model:
one threshold on the relative mean absolute change of the first block's output.
"""

from __future__ import annotations

import torch


class StepCache:
    """One render's state: the first block's output and the later blocks' residual at the last
    fully computed step. `threshold` 0 never skips."""

    def __init__(self, threshold: float) -> None:
        if threshold < 0:
            raise ValueError(f"step cache threshold {threshold}: use 0 (off) or a small positive number such as 0.05")
        self.threshold = threshold
        self.computed = 0
        self.skipped = 0
        self._first: torch.Tensor | None = None
        self._residual: torch.Tensor | None = None

    def reusable(self, first: torch.Tensor) -> torch.Tensor | None:
        """The residual to add to `first` (this step's first-block output) instead of running the
        other blocks, or None when they must run."""
        if self._first is None or self._first.shape != first.shape or self.threshold == 0:
            return None
        change = (first.float() - self._first.float()).abs().mean() / self._first.float().abs().mean().clamp_min(1e-12)
        if change.item() >= self.threshold:
            return None
        self.skipped += 1
        return self._residual

    def store(self, first: torch.Tensor, last: torch.Tensor) -> None:
        """After a fully computed step: its first-block output and the later blocks' residual."""
        self.computed += 1
        self._first = first
        self._residual = last - first
