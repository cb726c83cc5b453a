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


class _SlabLayout:
    """Where cuts land: slab sizes and the bytes cut from each since the last rewind (first fit;
    the shared bookkeeping of `PinnedArena` and of the planner's `PinnedArena.reserved_for`)."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.used: list[int] = []

    def cut(self, nbytes: int) -> tuple[int, int]:
        """(slab index, byte offset) of a cut of `nbytes`, adding a slab when none has room: the
        first slab with room at its end, else a new one doubling the last (up to `MAX_SLAB`; a
        larger request gets a slab of its own, rounded to a power of two)."""
        size = _round_up(max(nbytes, 1), ALIGN)
        slab = next((i for i, s in enumerate(self.sizes) if self.used[i] + size <= s), len(self.sizes))
        if slab == len(self.sizes):
            previous = self.sizes[-1] if self.sizes else 0
            self.sizes.append(max(1 << (size - 1).bit_length(), min(2 * previous, MAX_SLAB)))
            self.used.append(0)
        offset = self.used[slab]
        self.used[slab] += size
        return slab, offset


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
        self.layout = _SlabLayout()

    @property
    def reserved_bytes(self) -> int:
        return sum(s.numel() for s in self.slabs)

    def rewind(self) -> None:
        self.layout.used = [0] * len(self.slabs)

    def empty(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised pinned tensor of `shape` and `dtype` (contiguous)."""
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        slab, offset = self.layout.cut(nbytes)
        if slab == len(self.slabs):
            self.slabs.append(torch.empty(self.layout.sizes[slab], dtype=torch.uint8, pin_memory=self.pin))
        return self.slabs[slab][offset: offset + nbytes].view(dtype).view(shape)

    @staticmethod
    def _layout_for(requests: list[int]) -> _SlabLayout:
        layout = _SlabLayout()
        for nbytes in requests:
            layout.cut(nbytes)
        return layout

    @staticmethod
    def reserved_for(requests: list[int]) -> int:
        """Bytes of slabs a fresh arena reserves for these requests (in bytes, in this order): the
        memory planner's figure for a step's offloaded tensors, slab ends included."""
        return sum(PinnedArena._layout_for(requests).sizes)

    def reserve(self, requests: list[int]) -> None:
        """Allocate now, in an empty arena, the slabs these requests (bytes, in this order) will be
        cut from: pinning tens of GiB takes seconds, which a run pays alongside loading the model
        instead of inside its first step. Later cuts of the same sizes land in these slabs. An arena
        that already holds slabs has grown for its requests: nothing is added."""
        if self.slabs:
            return
        layout = self._layout_for(requests)
        slabs = [torch.empty(size, dtype=torch.uint8, pin_memory=self.pin) for size in layout.sizes]
        self.layout.sizes, self.layout.used = list(layout.sizes), [0] * len(slabs)
        self.slabs = slabs
