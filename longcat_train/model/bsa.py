"""Block-sparse attention (BSA) as used by LongCat-Video's 720p refinement stage, with a backward pass.

Semantics, checked against the official ``longcat_video/block_sparse_attention`` code
(``flash_attn_bsa_3d`` → ``_attention_bsa``):

* Tokens arrive in raster ``(t, h, w)`` order and are regrouped into 3D chunks of
  ``chunk_3d_shape`` tokens (LongCat's config: ``(4, 4, 4)`` = 64 tokens), chunks in row-major
  ``(t, h, w)`` order and tokens row-major inside a chunk; the output is put back in raster order.
* Gating: q and k are mean-pooled per chunk; the score of a query chunk against a key chunk is the
  plain dot product of the pooled vectors (no softmax scale: it would not change the ranking).
  Each (batch, head, query chunk) keeps the top ``int((1 - sparsity) * num_kv_chunks)`` key chunks.
  There is no forced "diagonal"/own chunk and no softmax or CDF threshold in the top-k mode the
  model uses. Selection is not differentiated.
* Attention runs over the kept chunks only, softmax scale ``1/sqrt(head_dim)``.
* Query and key grids may differ (the model's condition-frame split: queries are the noisy frames,
  keys all frames); the chunk shapes may differ too.

Where we deliberately differ from the official code:

* The official code asserts that the token grid is divisible by the chunk shape (its 720p buckets
  are e.g. 704x1280). We pad t/h/w up to multiples instead: pooled means use real tokens only,
  padded keys never receive attention weight, padded queries are dropped from the output. On a
  divisible grid this is exactly the official behaviour.
* The top-k count is at least 1 (the official code would select nothing and return zeros when
  ``int((1 - sparsity) * n) == 0``).
* Pooling and gating scores are computed in float32 (the official code uses the input dtype, bf16;
  on the GPU the score products run as three-pass TF32, which matches float32 to about 1e-6
  relative); only near-ties can rank differently. The kernels walk each query chunk's kept chunks
  ascending, those without padding first, then those holding padding with their real rows packed
  several chunks to a tile (the order changes only floating-point rounding).
* The dK/dV pass walks a transposed (CSR) index — per key chunk, the query chunks that kept it —
  like the official kernel, so gradients are deterministic (no atomics).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton

from longcat_train.model import bsa_kernels
from longcat_train.model.activation_offload import keep_on_host
from longcat_train.model.bsa_settings import kept_kv_block_count

Shape3D = tuple[int, int, int]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class _ChunkGrid:
    """How a raster token grid maps onto (padded) 3D chunks."""

    latent: Shape3D
    chunk: Shape3D

    @property
    def counts(self) -> Shape3D:
        t, h, w = (math.ceil(size / c) for size, c in zip(self.latent, self.chunk))
        return t, h, w

    @property
    def padded(self) -> Shape3D:
        t, h, w = (n * c for n, c in zip(self.counts, self.chunk))
        return t, h, w

    @property
    def n_tokens(self) -> int:
        return math.prod(self.latent)

    @property
    def n_chunks(self) -> int:
        return math.prod(self.counts)

    @property
    def chunk_tokens(self) -> int:
        return math.prod(self.chunk)

    @property
    def has_padding(self) -> bool:
        return self.padded != self.latent


def _make_grid(latent: tuple[int, ...], chunk: tuple[int, ...], name: str) -> _ChunkGrid:
    latent_t = tuple(int(x) for x in latent)
    chunk_t = tuple(int(x) for x in chunk)
    if len(latent_t) != 3 or min(latent_t) < 1:
        raise ValueError(f"latent_shape_{name} must be three positive ints (t, h, w); got {latent}")
    if len(chunk_t) != 3 or min(chunk_t) < 1:
        raise ValueError(f"chunk_3d_shape_{name} must be three positive ints (t, h, w); got {chunk}")
    tokens = math.prod(chunk_t)
    # tl.dot needs power-of-two tiles of at least 16 rows.
    if tokens < 16 or tokens & (tokens - 1):
        raise ValueError(
            f"chunk_3d_shape_{name}={chunk_t} holds {tokens} tokens; the kernel needs a power of two "
            ">= 16 (LongCat uses (4, 4, 4) = 64)"
        )
    return _ChunkGrid(latent_t, chunk_t)  # type: ignore[arg-type]


def _to_chunks(x: torch.Tensor, grid: _ChunkGrid) -> torch.Tensor:
    """[B, H, N, D] raster → [B, H, n_chunks * chunk_tokens, D] chunk order (`_chunk_tokens`),
    zero padding. The PyTorch reference of the Triton regroup."""
    tokens = _chunk_tokens(grid, x.device).long()
    return x[:, :, tokens.clamp(min=0)].masked_fill((tokens < 0)[:, None], 0)


@functools.lru_cache(maxsize=16)
def _chunk_tokens(grid: _ChunkGrid, device: torch.device) -> torch.Tensor:
    """int32 [n_chunks * chunk_tokens]: the raster token of each chunk-order row, -1 for padding.
    Chunks row-major over the padded (t, h, w) chunk grid; inside a chunk first its real tokens
    (row-major), then its padding rows, so that the kernels can pack the real rows of several kept
    chunks on the grid's far edges into one tile. Cached: every block's forward and backward of a
    bucket use the same one."""
    (t, h, w), (pt, ph, pw) = grid.latent, grid.padded
    tokens = torch.arange(grid.n_tokens, device=device).reshape(t, h, w)
    tokens = F.pad(tokens, (0, pw - w, 0, ph - h, 0, pt - t), value=-1)
    (nt, nh, nw), (ct, ch, cw) = grid.counts, grid.chunk
    tokens = tokens.reshape(nt, ct, nh, ch, nw, cw).permute(0, 2, 4, 1, 3, 5).reshape(grid.n_chunks, -1)
    real_first = torch.sort((tokens < 0).to(torch.uint8), dim=1, stable=True).indices
    return tokens.gather(1, real_first).reshape(-1).to(torch.int32)


@functools.lru_cache(maxsize=16)
def _chunk_real_rows(grid: _ChunkGrid, device: torch.device) -> torch.Tensor:
    """int32 [n_chunks]: how many of each chunk's rows are real tokens."""
    rows = _chunk_tokens(grid, device).reshape(grid.n_chunks, grid.chunk_tokens)
    return (rows >= 0).sum(1, dtype=torch.int32)


def _raster_chunk_ids(grid: _ChunkGrid, device: torch.device) -> torch.Tensor:
    """long [N]: the chunk each raster token belongs to."""
    t, h, w = (torch.arange(n, device=device) for n in grid.latent)
    (ct, ch, cw), (_, nh, nw) = grid.chunk, grid.counts
    ids = ((t // ct)[:, None, None] * nh + (h // ch)[None, :, None]) * nw + (w // cw)[None, None, :]
    return ids.reshape(-1)


def _pool_chunks(x_chunks: torch.Tensor, grid: _ChunkGrid) -> torch.Tensor:
    """Mean over the real tokens of each chunk, float32: [B, H, n_chunks, D]."""
    b, h, _, d = x_chunks.shape
    sums = x_chunks.reshape(b, h, grid.n_chunks, grid.chunk_tokens, d).sum(3, dtype=torch.float32)
    # Padding rows are zero, so dividing by the real-token count gives the mean over real tokens.
    return sums / _chunk_real_rows(grid, x_chunks.device)[:, None].to(torch.float32)


def _top_chunks(pooled_q: torch.Tensor, pooled_k: torch.Tensor, keep: int, key_real: torch.Tensor,
                chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `keep` key chunks with the highest gate scores per query chunk, int32 [B, H, n_q_chunks,
    keep]: first, ascending, those whose `key_real` (int32 [n_k_chunks], real rows) equals
    `chunk_rows`, then, ascending, those holding padding; and how many come first, int32 [B, H,
    n_q_chunks]. pooled_q: float32 [B, H, n_q_chunks, D], pooled_k: float32 [B, H, n_k_chunks, D],
    contiguous."""
    if not (pooled_q.is_cuda or bsa_kernels.triton_interpreting()):
        # Without Triton (the CPU reference path) the same selection through PyTorch; only exact
        # ties may resolve differently (the kernel keeps the lower column).
        scores = pooled_q @ pooled_k.transpose(-1, -2)
        kept = torch.topk(scores, keep, dim=-1, sorted=False).indices
        padded = key_real[kept] != chunk_rows
        kept = (kept + padded * pooled_k.shape[2]).sort(dim=-1).values % pooled_k.shape[2]
        return kept.to(torch.int32).contiguous(), (~padded).sum(-1, dtype=torch.int32)
    b, h, n_rows, d = pooled_q.shape
    n_cols = pooled_k.shape[2]
    scores = pooled_q.new_empty(b, h, n_rows, n_cols)
    kv_index = torch.empty(b, h, n_rows, keep, dtype=torch.int32, device=pooled_q.device)
    n_full = torch.empty(b, h, n_rows, dtype=torch.int32, device=pooled_q.device)
    tile = 64
    with _on_device_of(pooled_q):
        bsa_kernels.bsa_gate_scores_kernel[(triton.cdiv(n_rows, tile), triton.cdiv(n_cols, tile), b * h)](
            pooled_q, pooled_k, scores, n_rows, n_cols, d, BLOCK=tile, BLOCK_D=max(16, triton.next_power_of_2(d)))
        bsa_kernels.bsa_topk_kernel[(b * h * n_rows,)](
            scores, key_real, kv_index, n_full, n_cols, keep, chunk_rows,
            BLOCK=max(16, triton.next_power_of_2(n_cols)), num_warps=1)
    return kv_index, n_full


def _select(pooled_q: torch.Tensor, pooled_k: torch.Tensor, grid_k: _ChunkGrid,
            sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`_top_chunks` for key chunks on `grid_k` at `sparsity`."""
    return _top_chunks(pooled_q, pooled_k, kept_kv_block_count(grid_k.n_chunks, sparsity),
                       _chunk_real_rows(grid_k, pooled_k.device), grid_k.chunk_tokens)


def _checked_grids(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, latent_q: Shape3D, latent_k: Shape3D,
                   chunk_q: Shape3D, chunk_k: Shape3D, sparsity: float) -> tuple[_ChunkGrid, _ChunkGrid]:
    """The query and key chunk grids, after checking every argument against them."""
    grid_q, grid_k = _make_grid(latent_q, chunk_q, "q"), _make_grid(latent_k, chunk_k, "k")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, heads, N, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree: k and v "
                         "must match, and batch, heads and head_dim must match q")
    if q.shape[2] != grid_q.n_tokens:
        raise ValueError(f"q has {q.shape[2]} tokens but latent_shape_q={grid_q.latent} holds "
                         f"{grid_q.n_tokens}")
    if k.shape[2] != grid_k.n_tokens:
        raise ValueError(f"k has {k.shape[2]} tokens but latent_shape_k={grid_k.latent} holds "
                         f"{grid_k.n_tokens}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1); got {sparsity}")
    return grid_q, grid_k


def select_kv_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    latent_shape_q: Shape3D,
    latent_shape_k: Shape3D,
    sparsity: float = 0.9375,
    chunk_3d_shape_q: Shape3D = (4, 4, 4),
    chunk_3d_shape_k: Shape3D = (4, 4, 4),
) -> torch.Tensor:
    """Kept key blocks per query block: int32 ``[B, heads, n_q_blocks, k_keep]``, ascending (the
    kernels' own lists put the blocks without padding first).

    Blocks are numbered row-major over the (padded) chunk grid. q and k are raster-ordered
    ``[B, heads, N, D]``.
    """
    grid_q, grid_k = _checked_grids(q, k, k, latent_shape_q, latent_shape_k, chunk_3d_shape_q, chunk_3d_shape_k,
                                    sparsity)
    with torch.no_grad():
        pooled_q, pooled_k = (_pool_chunks(_to_chunks(x, grid), grid) for x, grid in ((q, grid_q), (k, grid_k)))
        return _select(pooled_q, pooled_k, grid_k, sparsity)[0].sort(-1).values


def _queries_by_kv_block(kv_index: torch.Tensor,
                         n_kv_blocks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Transpose the selection into CSR form for the dK/dV pass.

    Returns ``q_list`` int32 [B*H, n_q_blocks * k_keep] (query blocks grouped by the key block they
    kept, ascending inside a group), ``q_list_start`` int32 [B*H, n_kv_blocks + 1] and ``k_order``
    int32 [B*H, n_kv_blocks] (key blocks by descending group size, the order the pass takes them).
    """
    b, h, n_q_blocks, keep = kv_index.shape
    flat = kv_index.reshape(b * h, n_q_blocks * keep)
    # A stable sort keeps the original (query-block-major) order inside each key block's group.
    order = torch.sort(flat, dim=-1, stable=True).indices
    q_list = (order // keep).to(torch.int32).contiguous()
    # Counted by scatter-add, not bincount: bincount reads its input's maximum back to the host,
    # which stalls the launching thread (and the side stream's overlap with the dQ pass).
    counts = torch.zeros(b * h, n_kv_blocks, dtype=torch.int32, device=flat.device)
    counts.scatter_add_(1, flat.long(), torch.ones_like(flat))
    q_list_start = torch.zeros(b * h, n_kv_blocks + 1, dtype=torch.int32, device=flat.device)
    q_list_start[:, 1:] = counts.cumsum(-1)
    k_order = torch.argsort(counts, dim=-1, descending=True, stable=True).to(torch.int32)
    return q_list, q_list_start, k_order


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs (tests, reference-grade runs) get exact products; 16-bit inputs ignore this.
    return "ieee" if dtype == torch.float32 else "tf32"


def _on_device_of(t: torch.Tensor) -> contextlib.AbstractContextManager[object]:
    # Triton launches on the current CUDA device; make it the tensors' one.
    if t.is_cuda:
        # Kernels that build TMA descriptors on the device take global scratch memory through
        # Triton's allocator hook, a context variable: set in every launching thread (autograd runs
        # backward in threads of its own), served by PyTorch's caching allocator.
        triton.set_allocator(_torch_scratch)
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _torch_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")  # the current device: `_on_device_of`'s


# A registered op (not a bare autograd.Function) so that selective activation checkpointing sees it
# as one operation and keeps its outputs instead of re-running selection and kernels in backward.
# The raster q, k, v are inputs for the gradients' sake only: the kernels read the chunk-order
# copies and pooled means that `_regroup` made outside the op, so that checkpointing caches only
# the op's outputs and recomputes those copies.
@torch.library.custom_op("longcat::block_sparse_attention", mutates_args=())
def _bsa_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_chunks: torch.Tensor, k_chunks: torch.Tensor,
            v_chunks: torch.Tensor, pooled_q: torch.Tensor, pooled_k: torch.Tensor, latent_q: list[int],
            chunk_q: list[int], latent_k: list[int], chunk_k: list[int],
            sparsity: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output [B, heads, Nq, D] in token-major storage, log-sum-exp [B, heads, n_q_rows] float32,
    kept key chunks [B, heads, n_q_chunks, keep] and how many of them come first without padding
    [B, heads, n_q_chunks])."""
    grid_q, grid_k = _ChunkGrid(tuple(latent_q), tuple(chunk_q)), _ChunkGrid(tuple(latent_k), tuple(chunk_k))
    kv_index, n_full = _select(pooled_q, pooled_k, grid_k, sparsity)
    b, h, n_q, d = q.shape
    o = _token_major_empty(q, n_q)
    lse = torch.empty(b, h, q_chunks.shape[2], dtype=torch.float32, device=q.device)
    with _on_device_of(q):
        bsa_kernels.bsa_forward_kernel[(grid_q.n_chunks, b * h)](
            q_chunks, k_chunks, v_chunks, o, lse, kv_index, n_full, _chunk_tokens(grid_q, q.device),
            _chunk_real_rows(grid_k, q.device), *_segment_scratch(kv_index, grid_k), q_chunks.shape[2],
            k_chunks.shape[2], n_q, h, kv_index.shape[-1],
            _softmax_scale(d) * bsa_kernels.LOG2_E, KEEP_BLOCK=triton.next_power_of_2(kv_index.shape[-1]),
            **_kernel_constants(q, grid_q, grid_k),
        )
    return o, lse, kv_index, n_full


def _bsa_setup_context(ctx, inputs, output) -> None:
    _, _, _, q_chunks, k_chunks, v_chunks, _, _, latent_q, chunk_q, latent_k, chunk_k, _ = inputs
    o, lse, kv_index, n_full = output
    ctx.save_for_backward(q_chunks, k_chunks, v_chunks, o, lse, kv_index, n_full)
    ctx.grids = (_ChunkGrid(tuple(latent_q), tuple(chunk_q)), _ChunkGrid(tuple(latent_k), tuple(chunk_k)))
    ctx.mark_non_differentiable(lse, kv_index, n_full)


def _bsa_backward(ctx, grad_out, _grad_lse, _grad_index, _grad_n_full):
    q_chunks, k_chunks, v_chunks, o, lse, kv_index, n_full = ctx.saved_tensors
    grid_q, grid_k = ctx.grids
    do_chunks, _, delta = _regroup(grad_out, grid_q, delta_of=o)
    # the transposed index (a few small sorting kernels) runs alongside the dQ pass
    transposed_index = _alongside(_queries_by_kv_block, kv_index, grid_k.n_chunks)
    b, h, n_q_rows, d = q_chunks.shape
    n_k_rows, keep = k_chunks.shape[2], kv_index.shape[-1]
    scale = _softmax_scale(d)
    constants = _kernel_constants(q_chunks, grid_q, grid_k)
    q_tokens, k_tokens = _chunk_tokens(grid_q, o.device), _chunk_tokens(grid_k, o.device)
    dq = _token_major_empty(q_chunks, grid_q.n_tokens)
    dk, dv = _token_major_empty(k_chunks, grid_k.n_tokens), _token_major_empty(v_chunks, grid_k.n_tokens)
    with _on_device_of(o):
        bsa_kernels.bsa_backward_dq_kernel[(grid_q.n_chunks, b * h)](
            q_chunks, k_chunks, v_chunks, do_chunks, lse, delta, dq, kv_index, n_full, q_tokens,
            _chunk_real_rows(grid_k, o.device), *_segment_scratch(kv_index, grid_k), n_q_rows, n_k_rows,
            grid_q.n_tokens, h, keep,
            scale * bsa_kernels.LOG2_E, scale, KEEP_BLOCK=triton.next_power_of_2(keep), **constants,
        )
        q_list, q_list_start, k_order = transposed_index()
        bsa_kernels.bsa_backward_dkdv_kernel[(grid_k.n_chunks, b * h)](
            q_chunks, k_chunks, v_chunks, do_chunks, lse, delta, dk, dv, q_list, q_list_start, k_order, k_tokens,
            n_q_rows, n_k_rows, grid_k.n_tokens, h, q_list.shape[-1], scale * bsa_kernels.LOG2_E, scale,
            **constants,
        )
    return (dq, dk, dv) + (None,) * 10


torch.library.register_autograd("longcat::block_sparse_attention", _bsa_backward, setup_context=_bsa_setup_context)


def _alongside(fn: Callable[..., tuple[torch.Tensor, ...]], first: torch.Tensor, *args) -> Callable[[], tuple]:
    """Start `fn(first, *args)` (returning a tuple of tensors) on a side stream when `first` is on a
    GPU, so that it runs alongside what the current stream is given next; returns a function that
    makes the current stream wait for it and hands its result over."""
    if not first.is_cuda:
        result = fn(first, *args)
        return lambda: result
    current, side = torch.cuda.current_stream(first.device), _side_stream(first.device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        result = fn(first, *args)
    first.record_stream(side)

    def join() -> tuple:
        current.wait_stream(side)
        for tensor in result:
            tensor.record_stream(current)
        return result

    return join


@functools.lru_cache(maxsize=8)
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    # High priority: its kernels take multiprocessors as the running kernel's programs retire, not
    # after all of them (at default priority the transposed index waited out the whole dQ pass).
    return torch.cuda.Stream(device=device, priority=-1)


def _token_major_empty(like: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """An uninitialised [B, heads, n_tokens, D] tensor stored token-major ([B, N, heads, D]), the
    transformer's layout, which the kernels write raster rows of."""
    b, h, _, d = like.shape
    return like.new_empty(b, n_tokens, h, d).transpose(1, 2)


def _segment_scratch(kv_index: torch.Tensor, grid_k: _ChunkGrid) -> tuple[torch.Tensor, int]:
    """Per query chunk room for the packed segments of its kept padded key chunks (see
    `bsa_kernels._pack_padded_segments`) and that room's size: the segments of `keep` chunks or of
    all padded chunks of the grid, whichever is fewer, rounded up to whole tiles. Transient (22 MB
    at 720p); one element when the key grid has no padding (the kernels then never touch it)."""
    if not grid_k.has_padding:
        return torch.empty(1, dtype=torch.int32, device=kv_index.device), 0
    slots = grid_k.chunk_tokens // bsa_kernels.SEGMENT_ROWS
    per_row = min(kv_index.shape[-1], math.ceil(_padded_segment_count(grid_k) / slots)) * slots
    return torch.empty(kv_index[..., 0].numel() * per_row, dtype=torch.int32, device=kv_index.device), per_row


@functools.lru_cache(maxsize=16)
def _padded_segment_count(grid: _ChunkGrid) -> int:
    """16-row segments of real tokens over all of the grid's chunks that hold padding (counted on
    the host, once per grid, so that sizing the scratch never waits on the GPU)."""
    real = _chunk_real_rows(grid, torch.device("cpu"))
    segments = (real + bsa_kernels.SEGMENT_ROWS - 1) // bsa_kernels.SEGMENT_ROWS
    return int(segments[real < grid.chunk_tokens].sum())


def _softmax_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def _kernel_constants(q: torch.Tensor, grid_q: _ChunkGrid, grid_k: _ChunkGrid) -> dict[str, object]:
    return dict(HEAD_DIM=q.shape[-1], CHUNK_M=grid_q.chunk_tokens, CHUNK_N=grid_k.chunk_tokens,
                HAS_KEY_PAD=grid_k.has_padding, DOT_PRECISION=_dot_precision(q.dtype))


def _regroup(src: torch.Tensor, grid: _ChunkGrid, pool: bool = False, delta_of: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Triton copy of raster [B, H, N, D] (any strides with a contiguous head dim) into contiguous
    chunk order. With `pool` also the chunks' float32 means over their real tokens
    [B, H, n_chunks, D] (the block selection's input); with `delta_of` (src being the output
    gradient, `delta_of` the output, any strides with a contiguous head dim) also
    rowsum(src * output) per chunk-order row, float32 [B, H, n_chunk_rows]. `_to_chunks` and
    `_pool_chunks` are the PyTorch references."""
    b, h, _, d = src.shape
    raster = src if src.stride(-1) == 1 else src.contiguous()
    chunked = src.new_empty(b, h, grid.n_chunks * grid.chunk_tokens, d)
    pooled = torch.empty(b, h, grid.n_chunks, d, dtype=torch.float32, device=src.device) if pool else None
    delta = torch.empty(chunked.shape[:3], dtype=torch.float32, device=src.device) if delta_of is not None else None
    o_args = (raster, 0, 0, 0) if delta_of is None else (delta_of, *delta_of.stride()[:3])
    with _on_device_of(src):
        bsa_kernels.bsa_regroup_kernel[(grid.n_chunks, b * h)](
            raster, chunked, _chunk_tokens(grid, src.device), *raster.stride()[:3], h, chunked.shape[2],
            chunked if pooled is None else pooled, *o_args, chunked if delta is None else delta,
            HEAD_DIM=d, CHUNK=grid.chunk_tokens, POOL=pool, DELTA_OF_O=delta_of is not None,
        )
    return chunked, pooled, delta


def bsa_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device`` (None when they can)."""
    if device.type == "cuda" or bsa_kernels.triton_interpreting():
        return None
    return (f"block-sparse attention needs a CUDA device (got {device.type}); "
            "use dense attention, or set TRITON_INTERPRET=1 before importing triton for slow CPU runs")


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    latent_shape_q: Shape3D,
    latent_shape_k: Shape3D,
    sparsity: float = 0.9375,
    chunk_3d_shape_q: Shape3D = (4, 4, 4),
    chunk_3d_shape_k: Shape3D = (4, 4, 4),
) -> torch.Tensor:
    """LongCat block-sparse attention. q: [B, heads, Nq, D], k/v: [B, heads, Nk, D], raster order.

    Returns [B, heads, Nq, D] in q's dtype. Differentiable in q, k and v (Triton backward).
    """
    grid_q, grid_k = _checked_grids(q, k, v, latent_shape_q, latent_shape_k, chunk_3d_shape_q, chunk_3d_shape_k,
                                    sparsity)
    head_dim = q.shape[-1]
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16 for the kernel; got {head_dim}")
    if q.dtype not in _SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype of {_SUPPORTED_DTYPES}; got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    reason = bsa_unavailable_reason(q.device)
    if reason is not None:
        raise RuntimeError(reason)

    q_chunks, pooled_q, _ = _regroup(q, grid_q, pool=True)
    k_chunks, pooled_k, _ = _regroup(k, grid_k, pool=True)
    v_chunks, _, _ = _regroup(v, grid_k)
    o, _, _, _ = _bsa_op(q, k, v, q_chunks, k_chunks, v_chunks, pooled_q, pooled_k, list(grid_q.latent),
                      list(grid_q.chunk), list(grid_k.latent), list(grid_k.chunk), float(sparsity))
    # the op's own output, which selective checkpointing caches: with activation offload its
    # bytes wait on the host until the block is recomputed
    keep_on_host(o, "self_attention")
    return o


def block_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    latent_shape_q: Shape3D,
    latent_shape_k: Shape3D,
    sparsity: float = 0.9375,
    chunk_3d_shape_q: Shape3D = (4, 4, 4),
    chunk_3d_shape_k: Shape3D = (4, 4, 4),
    *,
    kv_index: torch.Tensor | None = None,
    query_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense float32 attention in raster order, masked to the selected blocks (for tests/benchmarks).

    ``kv_index`` defaults to ``select_kv_blocks`` of the same inputs. ``query_index`` (long, raster
    positions) evaluates only those query rows, e.g. a slice of a large layer. Returns float32
    ``[B, heads, len(query_index) or Nq, D]``. Memory is O(Nq·Nk): small shapes or slices only.
    """
    grid_q, grid_k = _checked_grids(q, k, v, latent_shape_q, latent_shape_k, chunk_3d_shape_q, chunk_3d_shape_k,
                                    sparsity)
    if kv_index is None:
        kv_index = select_kv_blocks(q, k, latent_shape_q, latent_shape_k, sparsity,
                                    chunk_3d_shape_q, chunk_3d_shape_k)
    b, h = q.shape[:2]
    kept = torch.zeros(b, h, grid_q.n_chunks, grid_k.n_chunks, dtype=torch.bool, device=q.device)
    kept.scatter_(-1, kv_index.long(), True)
    q_chunk = _raster_chunk_ids(grid_q, q.device)
    if query_index is not None:
        q, q_chunk = q[:, :, query_index], q_chunk[query_index]
    allowed = kept[:, :, q_chunk][..., _raster_chunk_ids(grid_k, q.device)]
    scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return weights @ v.float()
