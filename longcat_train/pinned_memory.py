"""Pinned host memory handed out in exact sizes.

Written here because PyTorch's caching host allocator rounds every pinned allocation up to a
power of two: one 37,440 x 4,096 bf16 activation (0.29 GiB, 480x832x93) takes 0.5 GiB, one
4,096 x 11,008 bf16 weight 128 MiB for 86 MiB, so offloaded activations and swapped blocks would
hold 1.3-1.75x the RAM they need. An arena asks PyTorch only for power-of-two slabs (nothing lost to
rounding) and cuts tensors out of them one after another.
"""

from __future__ import annotations

import math

import torch

ALIGN = 4096  # page-aligned cuts: DMA engines copy whole pages
MAX_SLAB = 4 * 2**30


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class PinnedArena:
    """Pinned host memory cut from power-of-two slabs, first fit: each cut goes to the first slab
    with room at its end, so a slab's tail is left unused only when no later request fits it.
    `rewind()` makes every byte reusable (for per-step buffers whose users have all finished; the
    same requests then land in the same places); without it the arena only grows.

    Slabs double in size up to `MAX_SLAB` (a tiny model wastes little, a large run few slab ends);
    a request larger than that gets a slab of its own, rounded to a power of two. `pin=False` gives
    pageable slabs (machines without a GPU)."""

    def __init__(self, pin: bool = True) -> None:
        self.pin = pin
        self.slabs: list[torch.Tensor] = []
        self.used: list[int] = []  # bytes cut from each slab since the last rewind

    @property
    def reserved_bytes(self) -> int:
        return sum(s.numel() for s in self.slabs)

    def rewind(self) -> None:
        self.used = [0] * len(self.slabs)

    def empty(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised pinned tensor of `shape` and `dtype` (contiguous)."""
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        return self._cut(nbytes).view(dtype).view(shape)

    def _cut(self, nbytes: int) -> torch.Tensor:
        size = _round_up(max(nbytes, 1), ALIGN)
        slab = next((i for i, s in enumerate(self.slabs) if self.used[i] + size <= s.numel()), None)
        if slab is None:
            previous = self.slabs[-1].numel() if self.slabs else 0
            slab_bytes = max(1 << (size - 1).bit_length(), min(2 * previous, MAX_SLAB))
            self.slabs.append(torch.empty(slab_bytes, dtype=torch.uint8, pin_memory=self.pin))
            self.used.append(0)
            slab = len(self.slabs) - 1
        start = self.used[slab]
        self.used[slab] += size
        return self.slabs[slab][start: start + nbytes]
