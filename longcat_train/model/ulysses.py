"""Ulysses sequence parallelism: one sample's tokens split over the processes of a group.

Each process holds a tile of every latent frame: a band of the token grid (T, h, w), its rows
`r·h/P … (r+1)·h/P` when P divides h, else its columns (720p has 45 token rows and 80 columns), in
raster order, so per-frame modulation, the condition frames (the first `num_cond_latents` frames of
the tile) and cross-attention work on a tile as on a whole sample. Self-attention needs every
token: q, k and v go through an all-to-all that trades the tile of all heads for all tokens of H/P
heads, put back in the whole grid's raster order (so the condition-frame split and block-sparse
attention see the sample as one process would), and the output goes back the same way. The
prediction's tiles are gathered at the end, so the loss is computed as on one process; each
process's parameter gradients then cover its own tile, and their sum over the group is the whole
sample's gradient. (As the official inference code's `context_parallel/`, which splits H and W
both; one split axis keeps the raster reordering a single stack.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

Grid = tuple[int, int, int]


@dataclass(frozen=True)
class Band:
    """How the token grid is cut: along `axis` (1: rows, 2: columns) into `processes` bands."""

    axis: int
    processes: int
    rank: int
    group: object = None

    def whole(self, tile: Grid) -> Grid:
        """The grid whose band `tile` is."""
        return tuple(n * self.processes if i == self.axis else n for i, n in enumerate(tile))  # type: ignore[return-value]

    def cut(self, tile: Grid) -> tuple[int, ...]:
        """The whole grid's dims with the band index as its own dim, before the band's rows or
        columns: raster order of the whole grid = this shape flattened."""
        dims = list(tile)
        dims.insert(self.axis, self.processes)
        return tuple(dims)


def _heads_to_tokens(x: torch.Tensor, tile: Grid, band: Band) -> torch.Tensor:
    """[B, H, tile tokens, D] on each process → [B, H/P, all tokens in raster order, D]."""
    P = band.processes
    B, H, n, D = x.shape
    send = x.reshape(B, P, H // P, n, D).transpose(0, 1).contiguous()  # head chunk j goes to process j
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=band.group)  # received[i]: process i's tile of my heads
    tiles = received.view(P, B, H // P, *tile, D).unbind(0)
    return torch.stack(tiles, dim=2 + band.axis).reshape(B, H // P, -1, D)


def _tokens_to_heads(x: torch.Tensor, tile: Grid, band: Band) -> torch.Tensor:
    """The inverse of `_heads_to_tokens`."""
    P = band.processes
    B, heads, _, D = x.shape
    send = x.view(B, heads, *band.cut(tile), D).movedim(2 + band.axis, 0).contiguous()  # tile j to process j
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=band.group)  # received[i]: my tile of process i's heads
    return received.view(P, B, heads, -1, D).transpose(0, 1).reshape(B, P * heads, -1, D)


class _Exchange(torch.autograd.Function):
    """`_heads_to_tokens` (or its inverse): a permutation of the elements over the group, so its
    backward is the inverse exchange of the gradient."""

    @staticmethod
    def forward(ctx, x, tile, band, to_tokens: bool):
        ctx.tile, ctx.band, ctx.to_tokens = tile, band, to_tokens
        return (_heads_to_tokens if to_tokens else _tokens_to_heads)(x, tile, band)

    @staticmethod
    def backward(ctx, grad):
        inverse = _tokens_to_heads if ctx.to_tokens else _heads_to_tokens
        return inverse(grad.contiguous(), ctx.tile, ctx.band), None, None, None


class _GatherTiles(torch.autograd.Function):
    """[B, tile tokens, K] on each process → [B, all tokens in raster order, K] on every process. The
    loss is then the same on every process, so each one's gradient is its own tile of it."""

    @staticmethod
    def forward(ctx, x, tile, band):
        ctx.tile, ctx.band = tile, band
        parts = [torch.empty_like(x) for _ in range(band.processes)]
        dist.all_gather(parts, x.contiguous(), group=band.group)
        B, _, K = x.shape
        return torch.stack([part.view(B, *tile, K) for part in parts], dim=1 + band.axis).reshape(B, -1, K)

    @staticmethod
    def backward(ctx, grad):
        band = ctx.band
        B, _, K = grad.shape
        return grad.reshape(B, *band.cut(ctx.tile), K).select(1 + band.axis, band.rank).reshape(B, -1, K), None, None


class TileRope:
    """The RoPE tables of a tile: its band of the whole grid's (positions are the sample's)."""

    def __init__(self, rope, band: Band) -> None:
        self.rope, self.band = rope, band
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def cos_sin(self, tile: Grid, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tile, device)
        if key not in self._cache:
            band = self.band
            tables = self.rope.cos_sin(band.whole(tile), device)
            self._cache[key] = tuple(t.view(*band.cut(tile), -1).select(band.axis, band.rank).reshape(-1, t.shape[-1])
                                     for t in tables)
        return self._cache[key]


class UlyssesAttention:
    """The attention dispatcher for tiles: self-attention over the whole sample with H/P heads per
    process; everything else (cross-attention's `dense`, settings) is the dispatcher's own."""

    def __init__(self, attention, band: Band) -> None:
        self.attention, self.band = attention, band

    def self_attention(self, q, k, v, tile_q: Grid, tile_k: Grid):
        band = self.band
        q = _Exchange.apply(q, tile_q, band, True)
        k, v = (_Exchange.apply(x, tile_k, band, True) for x in (k, v))
        out = self.attention.self_attention(q, k, v, band.whole(tile_q), band.whole(tile_k))
        return _Exchange.apply(out, tile_q, band, False)

    def __getattr__(self, name: str):
        return getattr(self.attention, name)


def band_axis(grid: Grid, num_heads: int, processes: int) -> int:
    """The axis of `grid` (1: rows, 2: columns) that `processes` cut into bands; a grid or head count
    they cannot share is refused, saying what would do."""
    if num_heads % processes:
        raise ValueError(f"sequence parallelism over {processes} processes splits the {num_heads} attention heads "
                         "evenly; use a number of processes that divides them")
    axis = next((axis for axis in (1, 2) if grid[axis] % processes == 0), None)
    if axis is None:
        raise ValueError(f"sequence parallelism over {processes} processes splits the token rows or columns "
                         f"(height / 16, width / 16) of a bucket evenly, and the token grid {grid} (frames, rows, "
                         "columns) has neither; use buckets whose token rows or columns the process count divides, "
                         "or another number of processes")
    return axis


class SequenceParallel:
    """A process group whose processes share one sample's tokens (`LongCatVideoTransformer3DModel.
    set_sequence_parallel`); None: the default group."""

    def __init__(self, group=None) -> None:
        self.group = group
        self.processes = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def band(self, grid: Grid, num_heads: int) -> Band:
        """How `grid` is cut over the processes (`band_axis`)."""
        return Band(band_axis(grid, num_heads, self.processes), self.processes, self.rank, self.group)

    @staticmethod
    def split(x: torch.Tensor, grid: Grid, band: Band) -> tuple[torch.Tensor, Grid]:
        """This process's tile of x [B, N, C] (raster order over `grid`) and the tile's grid."""
        B, _, C = x.shape
        tile: Grid = tuple(n // band.processes if i == band.axis else n for i, n in enumerate(grid))  # type: ignore[assignment]
        return x.view(B, *band.cut(tile), C).select(1 + band.axis, band.rank).reshape(B, -1, C), tile

    @staticmethod
    def gather(x: torch.Tensor, tile: Grid, band: Band) -> torch.Tensor:
        """Every process's tile of x [B, tile tokens, K], as the whole [B, N, K] on every process."""
        return _GatherTiles.apply(x, tile, band)
