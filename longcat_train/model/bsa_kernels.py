"""Triton kernels for block-sparse attention (see ``bsa.py`` for the semantics and the wrapper).

The attention kernels gather q, k, v (and dO) in chunk order: ``[B*H, n_chunks * CHUNK, HEAD_DIM]``
contiguous, so token chunk ``c`` of a (batch, head) is rows ``c*CHUNK .. (c+1)*CHUNK``, one contiguous
16 KiB block per 64-token chunk. (Gathering straight from the raster layout made the forward ~1.7x
slower on an H200: a chunk's rows are then scattered over the whole tensor.) What each program
writes once — its output rows, the input gradients — goes straight into the token-major raster
layout through a per-row token map (-1 for padding rows), which saves a regrouping copy each.
Softmax arguments are in log2 units (scores times ``sm_scale * log2(e)``) so the kernels can use
``exp2``; the saved log-sum-exp ``LSE`` (log2 units) and ``DELTA`` are per chunk-order row.

Written here (not taken from a library) because no maintained package ships a block-sparse
attention with LongCat's 3D block selection *and* a backward pass.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

LOG2_E = 1.4426950408889634
# Rows per packing segment of the kept key chunks that hold padding (tl.dot's minimum tile).
SEGMENT_ROWS = 16
SEGMENT = tl.constexpr(SEGMENT_ROWS)


def triton_interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    try:
        from triton import knobs  # Triton >= 3.4
    except ImportError:  # older Triton (e.g. on a GPU box with an older torch) reads the env directly
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return bool(knobs.runtime.interpret)


# `cache_results=True` on every autotuned kernel: Triton stores each tuning's timings in its cache
# directory (`TRITON_CACHE_DIR`, default ~/.triton/cache) keyed by the Triton version, the GPU
# architecture and compiler, the kernel's source and the shapes, so a run after the first on the
# same machine skips the benchmarking (seconds per kernel and shape at 720p) that otherwise
# delays every start.

# One launch shape under the interpreter (the autotuner then skips benchmarking).
INTERPRETER_CONFIG = triton.Config({}, num_warps=4, num_stages=1)


def _configs() -> list[triton.Config]:
    """Launch shapes for 64-token chunks with head_dim up to 128 on sm_90: one warpgroup per chunk;
    2 or 3 pipeline stages (at 720p on an H200 the forward runs best with 3, the backward passes
    with 2; a fourth stage leaves room for only one program per multiprocessor)."""
    if triton_interpreting():
        return [INTERPRETER_CONFIG]
    return [triton.Config({}, num_warps=4, num_stages=stages) for stages in (2, 3)]


AUTOTUNED_KERNELS = ("bsa_forward_kernel", "bsa_backward_dq_kernel", "bsa_backward_dkdv_kernel")


_TUNE_KEY = ["HEAD_DIM", "CHUNK_M", "CHUNK_N", "HAS_KEY_PAD", "DOT_PRECISION"]


@triton.jit
def _chunk_desc(base, n_rows, CHUNK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A TMA descriptor over all (batch, head) rows of a chunk-order tensor, one chunk per box: a
    gathered chunk is one contiguous [CHUNK, HEAD_DIM] block that the copy engine fetches
    asynchronously. (Triton lowers descriptors to plain loads before Hopper.)"""
    return tl.make_tensor_descriptor(base, shape=[n_rows, HEAD_DIM], strides=[HEAD_DIM, 1],
                                     block_shape=[CHUNK, HEAD_DIM])


@triton.jit
def _raster_offsets(token, bh, n_heads, stride_b, stride_h, stride_n, HEAD_DIM: tl.constexpr):
    """Offsets of (batch, head) `bh`'s rows at raster positions `token` in a [B, H, N, D] tensor with
    these strides (head dim contiguous). Padding rows (token -1) point at token 0: mask them."""
    n = tl.maximum(token, 0).to(tl.int64)
    rows = bh // n_heads * stride_b + bh % n_heads * stride_h + n * stride_n
    return rows[:, None] + tl.arange(0, HEAD_DIM)[None, :]


@triton.jit
def _raster_tile(TOKENS, rows, bh, n_tokens, n_heads, HEAD_DIM: tl.constexpr):
    """Offsets of chunk-order `rows` of (batch, head) `bh` in a token-major raster tensor
    ([B, N, heads, D] storage, the transformer's layout, which the kernels allocate their outputs
    in), and a mask of the rows that are real tokens (`TOKENS` holds -1 for padding rows)."""
    token = tl.load(TOKENS + rows)
    offsets = _raster_offsets(token, bh, n_heads, n_tokens.to(tl.int64) * n_heads * HEAD_DIM, HEAD_DIM,
                              n_heads * HEAD_DIM, HEAD_DIM)
    return offsets, (token >= 0)[:, None]


@triton.jit
def _kept_key_sources(K, V, KV_INDEX, N_FULL, bh, q_chunk, n_k_rows, k_keep, CHUNK_N: tl.constexpr,
                      HEAD_DIM: tl.constexpr):
    """What a query chunk's program gathers its kept keys and values through: (the key and value
    descriptors, its head's first chunk-order row, its list of kept key chunks, how many of them
    come first as chunks without padding, the first of those)."""
    n_rows = tl.num_programs(1) * n_k_rows
    k_desc, v_desc = _chunk_desc(K, n_rows, CHUNK_N, HEAD_DIM), _chunk_desc(V, n_rows, CHUNK_N, HEAD_DIM)
    row = bh * tl.num_programs(0) + q_chunk
    kept = KV_INDEX + row * k_keep
    n_full = tl.load(N_FULL + row)
    return k_desc, v_desc, (bh * n_k_rows).to(tl.int32), kept, n_full, _next_entry(kept, 0, n_full)


@triton.jit
def _next_entry(LIST, i, end):
    """Entry i of an index list (0 past its end). The loops read each entry one iteration ahead so
    that the copy engine's next address is ready when the pipeliner issues the next loads (-1 % on
    the forward and dK/dV passes at 720p on an H200)."""
    return tl.load(LIST + i, mask=i < end, other=0)


@triton.jit
def _pack_padded_segments(SEGMENTS, segment_stride, kept, n_full, k_keep, K_REAL, bh, q_chunk,
                          KEEP_BLOCK: tl.constexpr, CHUNK_N: tl.constexpr):
    """Cut the kept key chunks that hold padding (list entries n_full .. k_keep-1) into SEGMENT-row
    segments of real keys, write them in order to this query chunk's `SEGMENTS` scratch
    (`segment_stride` elements; each segment as its first chunk-order row << 5 | its real-row count,
    0 for the empty slots that fill the last tile), and return the scratch and how many CHUNK_N-row
    tiles the segments fill. Rows inside a chunk come real ones first (`bsa._chunk_tokens`), so a
    chunk with r real rows is cdiv(r, SEGMENT) segments: at 720p an edge chunk (one real row of four
    in h) is one, and four of them share a tile. Written to memory once so that the loop reads each
    tile's rows with a plain load instead of searching registers across warps (which cost 480p
    2.6 % where it saved 720p 9 %)."""
    segments = SEGMENTS + (bh * tl.num_programs(0) + q_chunk) * segment_stride
    SLOTS: tl.constexpr = CHUNK_N // SEGMENT
    entry = tl.arange(0, KEEP_BLOCK)
    listed = n_full + entry < k_keep
    chunk = tl.load(kept + n_full + entry, mask=listed, other=0)
    real = tl.load(K_REAL + chunk, mask=listed, other=0)
    n_segments = tl.cdiv(real, SEGMENT)
    seg = tl.arange(0, SLOTS)[None, :]
    seg_real = tl.minimum(real[:, None] - seg * SEGMENT, SEGMENT)  # <= 0 past the chunk's last segment
    tl.store(segments + (tl.cumsum(n_segments, 0) - n_segments)[:, None] + seg,
             (chunk[:, None] * CHUNK_N + seg * SEGMENT) << 5 | seg_real, mask=seg_real > 0)
    total = tl.sum(n_segments, 0)
    n_tiles = tl.cdiv(total, SLOTS)
    tail = total + tl.arange(0, SLOTS)
    tl.store(segments + tail, tl.zeros([SLOTS], dtype=tl.int32), mask=tail < n_tiles * SLOTS)
    tl.debug_barrier()  # every thread's segments written before any thread reads them
    return segments, n_tiles


@triton.jit
def _packed_tile(SEGMENTS, tile, CHUNK_N: tl.constexpr):
    """Tile `tile` of `_pack_padded_segments`' packing: the chunk-order rows (within the head) it
    gathers and a mask of the rows that are real keys (empty slots: row 0 onwards, all masked)."""
    within = tl.arange(0, CHUNK_N)
    code = tl.load(SEGMENTS + tile * (CHUNK_N // SEGMENT) + within // SEGMENT)
    return (code >> 5) + within % SEGMENT, within % SEGMENT < (code & 31)


@triton.jit
def _full_chunk_scores(q, k_desc, v_desc, head_row, kept, slot, chunk, n_full, CHUNK_N: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    """Raw scores q·k against `chunk`, slot `slot` of the list's unpadded group, its keys and
    values (whole chunks through the copy engine), and the next slot's chunk id."""
    k = k_desc.load([head_row + chunk * CHUNK_N, 0])
    v = v_desc.load([head_row + chunk * CHUNK_N, 0])
    return tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), k, v, _next_entry(kept, slot + 1, n_full)


@triton.jit
def _packed_tile_scores(q, K, V, segments, head_base, tile, HEAD_DIM: tl.constexpr, CHUNK_N: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    """Raw scores q·k against packed tile `tile` (padding keys at -inf), its keys and values (the
    head's rows start at `head_base`)."""
    rows, real = _packed_tile(segments, tile, CHUNK_N)
    k = _rows_of(K, head_base, rows, HEAD_DIM)
    s = tl.where(real[None, :], tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), float("-inf"))
    return s, k, _rows_of(V, head_base, rows, HEAD_DIM)


@triton.jit
def _rows_of(X, head_base, rows, HEAD_DIM: tl.constexpr):
    """A [len(rows), HEAD_DIM] tile of chunk-order rows `rows` of the head starting at `head_base`."""
    return tl.load(X + (head_base + rows)[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :])


@triton.jit
def _attend(s, v, m_i, l_i, acc, qk_scale_log2, DOT_PRECISION: tl.constexpr):
    """One online-softmax step of the forward over a key tile: raw scores `s` (padding at -inf;
    every tile holds a real key, so the new row maximum is finite), its values `v`. Scores stay
    unscaled: the log2 softmax scale is folded into the one multiply-add that also subtracts the
    row maximum (a multiply less per score; with the padding mask kept off whole chunks, forward
    21.6 -> 20.3 ms at 720p on an H200). The scale is positive, so the maximum of the scaled scores is the scaled
    maximum."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale_log2)
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s * qk_scale_log2 - m_new[:, None])
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit
def _dq_step(s, k, v, do, lse, delta, dq, qk_scale_log2, DOT_PRECISION: tl.constexpr):
    """dQ (unscaled) plus one key tile's share: raw scores `s` (padding at -inf), keys, values."""
    p = tl.math.exp2(s * qk_scale_log2 - lse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)


@triton.autotune(configs=_configs(), key=_TUNE_KEY, cache_results=True)
@triton.jit
def bsa_forward_kernel(
    Q, K, V, O, LSE,
    KV_INDEX,  # int32 [B*H, n_q_chunks, k_keep]: kept key chunks per query chunk, unpadded ones first
    N_FULL,  # int32 [B*H, n_q_chunks]: how many of them hold no padding
    Q_TOKENS,  # int32 per chunk-order query row: its raster token, -1 for padding
    K_REAL,  # int32 [n_k_chunks]: real rows per key chunk
    SEGMENTS,  # int32 [B*H, n_q_chunks, segment_stride]: scratch for `_pack_padded_segments`
    segment_stride, n_q_rows, n_k_rows, n_q_tokens, n_heads, k_keep, qk_scale_log2,
    HEAD_DIM: tl.constexpr, CHUNK_M: tl.constexpr, CHUNK_N: tl.constexpr, KEEP_BLOCK: tl.constexpr,
    HAS_KEY_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One query chunk: O straight into the token-major raster output, LSE in chunk order. Kept
    chunks without padding are whole tiles fetched by the copy engine; those with padding (chunks on
    the grid's far edges, e.g. one real row of four in h at 720p) have their real rows packed
    several chunks to a tile and gathered by pointer loads (`_packed_tile`)."""
    q_chunk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    q_rows = q_chunk * CHUNK_M + tl.arange(0, CHUNK_M)
    q = tl.load(Q + bh * n_q_rows * HEAD_DIM + q_rows[:, None] * HEAD_DIM + offs_d[None, :])
    k_desc, v_desc, head_row, kept, n_full, chunk_next = _kept_key_sources(
        K, V, KV_INDEX, N_FULL, bh, q_chunk, n_k_rows, k_keep, CHUNK_N, HEAD_DIM)

    m_i = tl.full([CHUNK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([CHUNK_M], dtype=tl.float32)
    acc = tl.zeros([CHUNK_M, HEAD_DIM], dtype=tl.float32)
    for slot in range(0, n_full):
        s, _, v, chunk_next = _full_chunk_scores(q, k_desc, v_desc, head_row, kept, slot, chunk_next, n_full,
                                                 CHUNK_N, DOT_PRECISION)
        m_i, l_i, acc = _attend(s, v, m_i, l_i, acc, qk_scale_log2, DOT_PRECISION)
    if HAS_KEY_PAD:
        segments, n_tiles = _pack_padded_segments(SEGMENTS, segment_stride, kept, n_full, k_keep, K_REAL, bh,
                                                  q_chunk, KEEP_BLOCK, CHUNK_N)
        for tile in range(0, n_tiles):
            s, _, v = _packed_tile_scores(q, K, V, segments, bh * n_k_rows, tile, HEAD_DIM, CHUNK_N, DOT_PRECISION)
            m_i, l_i, acc = _attend(s, v, m_i, l_i, acc, qk_scale_log2, DOT_PRECISION)

    out, real_q = _raster_tile(Q_TOKENS, q_rows, bh, n_q_tokens, n_heads, HEAD_DIM)
    tl.store(O + out, (acc / l_i[:, None]).to(O.dtype.element_ty), mask=real_q)
    tl.store(LSE + bh * n_q_rows + q_rows, m_i + tl.math.log2(l_i))


@triton.autotune(configs=_configs(), key=_TUNE_KEY, cache_results=True)
@triton.jit
def bsa_backward_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    KV_INDEX, N_FULL, Q_TOKENS, K_REAL, SEGMENTS,
    segment_stride, n_q_rows, n_k_rows, n_q_tokens, n_heads, k_keep, qk_scale_log2, sm_scale,
    HEAD_DIM: tl.constexpr, CHUNK_M: tl.constexpr, CHUNK_N: tl.constexpr, KEEP_BLOCK: tl.constexpr,
    HAS_KEY_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dQ for one query chunk, into the token-major raster gradient; kept chunks walked as in the
    forward."""
    q_chunk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    q_rows = q_chunk * CHUNK_M + tl.arange(0, CHUNK_M)
    q_tile = bh * n_q_rows * HEAD_DIM + q_rows[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q + q_tile)
    do = tl.load(DO + q_tile)
    lse = tl.load(LSE + bh * n_q_rows + q_rows)
    delta = tl.load(DELTA + bh * n_q_rows + q_rows)
    k_desc, v_desc, head_row, kept, n_full, chunk_next = _kept_key_sources(
        K, V, KV_INDEX, N_FULL, bh, q_chunk, n_k_rows, k_keep, CHUNK_N, HEAD_DIM)

    dq = tl.zeros([CHUNK_M, HEAD_DIM], dtype=tl.float32)
    for slot in range(0, n_full):
        s, k, v, chunk_next = _full_chunk_scores(q, k_desc, v_desc, head_row, kept, slot, chunk_next, n_full,
                                                 CHUNK_N, DOT_PRECISION)
        dq = _dq_step(s, k, v, do, lse, delta, dq, qk_scale_log2, DOT_PRECISION)
    if HAS_KEY_PAD:
        segments, n_tiles = _pack_padded_segments(SEGMENTS, segment_stride, kept, n_full, k_keep, K_REAL, bh,
                                                  q_chunk, KEEP_BLOCK, CHUNK_N)
        for tile in range(0, n_tiles):
            s, k, v = _packed_tile_scores(q, K, V, segments, bh * n_k_rows, tile, HEAD_DIM, CHUNK_N, DOT_PRECISION)
            dq = _dq_step(s, k, v, do, lse, delta, dq, qk_scale_log2, DOT_PRECISION)

    raster, real_q = _raster_tile(Q_TOKENS, q_rows, bh, n_q_tokens, n_heads, HEAD_DIM)
    tl.store(DQ + raster, (dq * sm_scale).to(DQ.dtype.element_ty), mask=real_q)


@triton.autotune(configs=_configs(), key=_TUNE_KEY, cache_results=True)
@triton.jit
def bsa_backward_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    Q_LIST,  # int32 [B*H, n_q_chunks * k_keep]: query chunks grouped by the key chunk they kept
    Q_LIST_START,  # int32 [B*H, n_k_chunks + 1]: CSR offsets into Q_LIST
    K_ORDER,  # int32 [B*H, n_k_chunks]: key chunks by descending query-list length
    K_TOKENS,
    n_q_rows, n_k_rows, n_k_tokens, n_heads, q_list_len, qk_scale_log2, sm_scale,
    HEAD_DIM: tl.constexpr, CHUNK_M: tl.constexpr, CHUNK_N: tl.constexpr,
    HAS_KEY_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dK and dV for one key chunk, over the query chunks that kept it, into the token-major raster
    gradients. Programs take key chunks longest list first (`K_ORDER`): long lists no longer trail
    the launch, and programs running side by side step through the query chunks at similar rates,
    so the rows they read overlap in L2 (-9 % time at 720p on an H200). Padding keys need no mask:
    their rows are dropped on the way out. Padding queries contribute nothing: their dO (and so dP,
    delta and dS) rows are zero."""
    bh = tl.program_id(1).to(tl.int64)
    n_k_chunks = tl.num_programs(0)
    k_chunk = tl.load(K_ORDER + bh * n_k_chunks + tl.program_id(0))
    offs_d = tl.arange(0, HEAD_DIM)
    within_m = tl.arange(0, CHUNK_M)
    k_rows = k_chunk * CHUNK_N + tl.arange(0, CHUNK_N)
    kv_tile = bh * n_k_rows * HEAD_DIM + k_rows[:, None] * HEAD_DIM + offs_d[None, :]
    k = tl.load(K + kv_tile)
    v = tl.load(V + kv_tile)
    n_rows = tl.num_programs(1) * n_q_rows
    q_desc, do_desc = _chunk_desc(Q, n_rows, CHUNK_M, HEAD_DIM), _chunk_desc(DO, n_rows, CHUNK_M, HEAD_DIM)
    head_row = (bh * n_q_rows).to(tl.int32)
    row_stats = bh * n_q_rows
    queries = Q_LIST + bh * q_list_len
    start = Q_LIST_START + bh * (n_k_chunks + 1) + k_chunk
    first = tl.load(start)
    last = tl.load(start + 1)

    dk = tl.zeros([CHUNK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([CHUNK_N, HEAD_DIM], dtype=tl.float32)
    chunk_next = _next_entry(queries, first, last)
    for j in range(first, last):
        q_row = chunk_next * CHUNK_M
        chunk_next = _next_entry(queries, j + 1, last)
        q = q_desc.load([head_row + q_row, 0])
        do = do_desc.load([head_row + q_row, 0])
        lse = tl.load(LSE + row_stats + q_row + within_m)
        delta = tl.load(DELTA + row_stats + q_row + within_m)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale_log2
        p_t = tl.math.exp2(s_t - lse[None, :])
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)

    raster, real = _raster_tile(K_TOKENS, k_rows, bh, n_k_tokens, n_heads, HEAD_DIM)
    tl.store(DK + raster, (dk * sm_scale).to(DK.dtype.element_ty), mask=real)
    tl.store(DV + raster, dv.to(DV.dtype.element_ty), mask=real)


@triton.jit
def bsa_regroup_kernel(
    RASTER, CHUNKS, TOKENS,  # RASTER: [B, H, N, D] with any strides (head dim contiguous)
    stride_b, stride_h, stride_n, n_heads, n_chunk_rows,
    POOLED,  # with POOL: float32 [B*H, n_chunks, D]
    O, o_stride_b, o_stride_h, o_stride_n, DELTA,  # with DELTA_OF_O: O [B, H, N, D]; float32 [B*H, n_chunk_rows]
    HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr, POOL: tl.constexpr, DELTA_OF_O: tl.constexpr,
):
    """Copy one chunk of one (batch, head) from raster order into chunk order
    ([B*H, n_chunks * CHUNK, D], padding rows zero). With POOL also the chunk's mean over its real
    tokens (what the block selection scores); with DELTA_OF_O (RASTER being the output gradient
    dO) also DELTA = rowsum(dO * O) per row, which both backward passes read. A plain copy at
    memory bandwidth: PyTorch's permute-copy of the same 9-d view ran at a third of it (2.6 ms per
    86,400 x 4096 bf16 tensor on an H200)."""
    chunk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rows = chunk * CHUNK + tl.arange(0, CHUNK)
    offs_d = tl.arange(0, HEAD_DIM)
    token = tl.load(TOKENS + rows)
    real = token >= 0
    x = tl.load(RASTER + _raster_offsets(token, bh, n_heads, stride_b, stride_h, stride_n, HEAD_DIM),
                mask=real[:, None], other=0.0)
    tl.store(CHUNKS + (bh * n_chunk_rows + rows)[:, None] * HEAD_DIM + offs_d[None, :], x)
    if POOL:
        mean = tl.sum(x.to(tl.float32), 0) / tl.sum(real.to(tl.float32), 0)
        tl.store(POOLED + (bh * tl.num_programs(0) + chunk) * HEAD_DIM + offs_d, mean)
    if DELTA_OF_O:
        o = tl.load(O + _raster_offsets(token, bh, n_heads, o_stride_b, o_stride_h, o_stride_n, HEAD_DIM),
                    mask=real[:, None], other=0.0)
        tl.store(DELTA + bh * n_chunk_rows + rows, tl.sum(x.to(tl.float32) * o.to(tl.float32), 1))


@triton.jit
def bsa_gate_scores_kernel(POOLED_Q, POOLED_K, SCORES, n_q_chunks, n_k_chunks, head_dim, BLOCK: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    """One tile of gate scores, float32 [B*H, n_q_chunks, n_k_chunks]: pooled query chunks (float32
    [B*H, n_q_chunks, D]) dotted with pooled key chunks. Three-pass TF32 products (each operand split
    into a TF32 part and a TF32 remainder) agree with float32 to about 1e-6 relative and kept the
    same chunks as float32 at 720p; they ran in 0.33 ms on an H200 against 0.49 ms for cuBLAS's
    float32 GEMM. (Plain TF32 changed the kept chunks of 1,382 of the 46,080 query chunks.)"""
    bh = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)  # a power of two >= 16 (tl.dot's minimum), zero beyond head_dim
    pooled_q = tl.load(POOLED_Q + (bh * n_q_chunks + rows)[:, None] * head_dim + offs_d[None, :],
                       mask=(rows < n_q_chunks)[:, None] & (offs_d < head_dim)[None, :], other=0.0)
    pooled_k = tl.load(POOLED_K + (bh * n_k_chunks + cols)[:, None] * head_dim + offs_d[None, :],
                       mask=(cols < n_k_chunks)[:, None] & (offs_d < head_dim)[None, :], other=0.0)
    scores = tl.dot(pooled_q, tl.trans(pooled_k), input_precision="tf32x3")
    tl.store(SCORES + (bh * n_q_chunks + rows)[:, None] * n_k_chunks + cols[None, :], scores,
             mask=(rows < n_q_chunks)[:, None] & (cols < n_k_chunks)[None, :])


@triton.jit
def bsa_topk_kernel(SCORES, K_REAL, KV_INDEX, N_FULL, n_cols, keep, chunk_rows, BLOCK: tl.constexpr):
    """One row of gate scores (a query chunk against every key chunk): the `keep` best columns,
    ties to the lower column, listed ascending among the chunks without padding (`K_REAL` of them
    == `chunk_rows`), then ascending among those with padding; their count without padding goes to
    `N_FULL` (the attention kernels fetch the first group whole and pack the second). A radix select
    on the order-preserving integer image of the float scores finds a threshold bit by bit from the
    top, one compare-and-count pass over the row (in registers) per bit, and stops as soon as
    exactly `keep` scores reach it (after about 20 of the 32 bits for random scores); a prefix sum
    then compacts the kept columns in order. One read of the scores, where torch.topk and the sort
    after it took 2.2 ms at 720p on an H200. Launched with one warp per row: no barriers between
    the passes (0.50 ms there against 0.60 with four)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    x = tl.load(SCORES + row * n_cols + cols, mask=cols < n_cols, other=float("-inf"))
    bits = x.to(tl.int32, bitcast=True)
    # Flip the magnitude bits of negatives, then the sign bit: unsigned order == float order.
    key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.uint32, bitcast=True) ^ 0x80000000
    # Invariant: `reaching` scores have key >= threshold, and reaching >= keep.
    threshold = tl.zeros([], dtype=tl.uint32)
    reaching = tl.full([], BLOCK, tl.int32)
    bit = tl.full([], 31, tl.int32)
    while (bit >= 0) & (reaching != keep):
        candidate = threshold | (tl.full([], 1, tl.uint32) << bit.to(tl.uint32))
        count = tl.sum((key >= candidate).to(tl.int32), 0)
        threshold = tl.where(count >= keep, candidate, threshold)
        reaching = tl.where(count >= keep, count, reaching)
        bit -= 1
    kept = key >= threshold
    if reaching != keep:
        # All 32 bits are set and the threshold is the keep-th best score, shared by several
        # columns: the lowest of those columns fill the list.
        above = key > threshold
        tied = key == threshold
        kept = above | (tied & (tl.cumsum(tied.to(tl.int32), 0) <= keep - tl.sum(above.to(tl.int32), 0)))
    full = tl.load(K_REAL + cols, mask=cols < n_cols, other=0) == chunk_rows
    # One prefix sum counts both groups: kept full chunks in the low 16 bits, kept padded ones above
    # (a row has far fewer than 2**16 columns: it sits in one warp's registers).
    counts = tl.cumsum(tl.where(kept, tl.where(full, 1, 1 << 16), 0), 0)
    n_full = tl.sum((kept & full).to(tl.int32), 0)
    position = tl.where(full, counts & 0xFFFF, n_full + (counts >> 16)) - 1
    tl.store(KV_INDEX + row * keep + position, cols, mask=kept)
    tl.store(N_FULL + row, n_full)
