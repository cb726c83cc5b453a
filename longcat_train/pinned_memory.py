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
    """Bump allocator over pinned slabs. `rewind()` makes every byte reusable (for per-step
    buffers whose users all finished); without it the arena only grows (persistent buffers).

    Slabs double in size up to `MAX_SLAB` (a tiny model wastes little, a large run few slab ends);
    a request larger than that gets a slab of its own, rounded to a power of two. `pin=False` gives
    pageable slabs (machines without a GPU)."""

    def __init__(self, pin: bool = True) -> None:
        self.pin = pin
        self.slabs: list[torch.Tensor] = []
        self.slab = 0  # slab the next cut comes from
        self.offset = 0  # its first free byte

    @property
    def reserved_bytes(self) -> int:
        return sum(s.numel() for s in self.slabs)

    def rewind(self) -> None:
        self.slab = self.offset = 0

    def empty(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised pinned tensor of `shape` and `dtype` (contiguous)."""
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        return self._cut(nbytes).view(dtype).view(shape)

    def _cut(self, nbytes: int) -> torch.Tensor:
        size = _round_up(max(nbytes, 1), ALIGN)
        while self.slab < len(self.slabs) and self.offset + size > self.slabs[self.slab].numel():
            self.slab, self.offset = self.slab + 1, 0
        if self.slab == len(self.slabs):
            previous = self.slabs[-1].numel() if self.slabs else 0
            slab_bytes = max(1 << (size - 1).bit_length(), min(2 * previous, MAX_SLAB))
            self.slabs.append(torch.empty(slab_bytes, dtype=torch.uint8, pin_memory=self.pin))
        cut = self.slabs[self.slab][self.offset: self.offset + nbytes]
        self.offset += size
        return cut
