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
        slab, new_slab = _place([s.numel() for s in self.slabs], self.used, size)
        if new_slab:
            self.slabs.append(torch.empty(new_slab, dtype=torch.uint8, pin_memory=self.pin))
            self.used.append(0)
        start = self.used[slab]
        self.used[slab] += size
        return self.slabs[slab][start: start + nbytes]

    @staticmethod
    def reserved_for(requests: list[int]) -> int:
        """Bytes of slabs a fresh arena reserves for these requests (in bytes, in this order): the
        memory planner's figure for a step's offloaded tensors, slab ends included."""
        slabs: list[int] = []
        used: list[int] = []
        for nbytes in requests:
            size = _round_up(max(nbytes, 1), ALIGN)
            slab, new_slab = _place(slabs, used, size)
            if new_slab:
                slabs.append(new_slab)
                used.append(0)
            used[slab] += size
        return sum(slabs)


def _place(slabs: list[int], used: list[int], size: int) -> tuple[int, int]:
    """(slab index for a cut of `size` bytes, size of the new slab to add first or 0): the first
    slab with room, else a new one."""
    for i, slab_bytes in enumerate(slabs):
        if used[i] + size <= slab_bytes:
            return i, 0
    previous = slabs[-1] if slabs else 0
    return len(slabs), max(1 << (size - 1).bit_length(), min(2 * previous, MAX_SLAB))
