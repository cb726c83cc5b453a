"""Triton kernels for block-sparse attention (see ``bsa.py`` for the semantics and the wrapper).

All kernels work on tensors already regrouped into chunk order: ``[B*H, n_chunks * CHUNK, HEAD_DIM]``
contiguous, so token chunk ``c`` of a (batch, head) is rows ``c*CHUNK .. (c+1)*CHUNK``. (Reading
the raster layout directly through index arithmetic made the forward kernel ~1.7x slower on an H200: a chunk's
rows are then scattered over the whole tensor instead of one contiguous 16 KiB block.) Scores are
kept in log2 units (pre-multiplied by ``sm_scale * log2(e)``) so the kernels can use ``exp2``; the
saved log-sum-exp ``LSE`` and ``DELTA`` are per chunk-order row.

A tile holds ``CHUNKS_PER_TILE`` chunks (autotuned: two 64-token chunks make 128-wide tiles); a
remainder tile masks its missing chunks.

Written here (not taken from a library) because no maintained package ships a block-sparse
attention with LongCat's 3D block selection *and* a backward pass.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

LOG2_E = 1.4426950408889634


def triton_interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    try:
        from triton import knobs  # Triton >= 3.4
    except ImportError:  # older Triton (e.g. on a GPU box with an older torch) reads the env directly
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return bool(knobs.runtime.interpret)


# Under the interpreter: the TMA path by default; tests run each case through both (tests/test_bsa.py),
# the pointer one with two chunks per tile so that remainder tiles are exercised.
INTERPRETER_CONFIGS = {
    "tma": triton.Config({"CHUNKS_PER_TILE": 1, "USE_TMA": True}, num_warps=4, num_stages=1),
    "pointer": triton.Config({"CHUNKS_PER_TILE": 2, "USE_TMA": False}, num_warps=4, num_stages=1),
}


def _configs() -> list[triton.Config]:
    """Launch shapes for 64-token chunks with head_dim up to 128 on sm_90: gathered chunks read
    through pointers (one or two chunks per tile) or through TMA descriptors (one chunk per tile:
    a chunk is one contiguous [CHUNK, HEAD_DIM] box, which the copy engine fetches asynchronously).
    Under the interpreter a single config (the autotuner then skips benchmarking)."""
    if triton_interpreting():
        return [INTERPRETER_CONFIGS["tma"]]
    pointer = [triton.Config({"CHUNKS_PER_TILE": per_tile, "USE_TMA": False}, num_warps=warps, num_stages=stages)
               for per_tile in (1, 2) for warps in (4, 8) for stages in (2, 3)]
    tma = [triton.Config({"CHUNKS_PER_TILE": 1, "USE_TMA": True}, num_warps=warps, num_stages=stages)
           for warps in (4, 8) for stages in (2, 3, 4)]
    return pointer + tma


AUTOTUNED_KERNELS = ("bsa_forward_kernel", "bsa_backward_dq_kernel", "bsa_backward_dkdv_kernel")


_TUNE_KEY = ["HEAD_DIM", "CHUNK_M", "CHUNK_N", "HAS_KEY_PAD", "DOT_PRECISION"]


@triton.jit
def _chunk_rows_desc(base, n_rows, CHUNK: tl.constexpr, HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr):
    """A TMA descriptor over all (batch, head) rows of a chunk-order tensor, one chunk per box (the
    pointer itself on the pointer path, where it is not used). One return: Triton rejects returns
    of different types from one function."""
    desc = base
    if USE_TMA:
        desc = tl.make_tensor_descriptor(base, shape=[n_rows, HEAD_DIM], strides=[HEAD_DIM, 1],
                                         block_shape=[CHUNK, HEAD_DIM])
    return desc


@triton.jit
def _kept_key_sources(K, V, KV_INDEX, bh, q_chunk, n_q_chunks, n_k_rows, k_keep,
                      CHUNK_N: tl.constexpr, HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr):
    """What a query chunk's program reads its kept keys and values through: (K and V of its head,
    their descriptors, the head's first row, the start of its kept-chunk list)."""
    n_rows = tl.num_programs(1) * n_k_rows
    k_desc = _chunk_rows_desc(K, n_rows, CHUNK_N, HEAD_DIM, USE_TMA)
    v_desc = _chunk_rows_desc(V, n_rows, CHUNK_N, HEAD_DIM, USE_TMA)
    head = bh * n_k_rows * HEAD_DIM
    index_base = KV_INDEX + (bh * n_q_chunks + q_chunk) * k_keep
    return K + head, V + head, k_desc, v_desc, (bh * n_k_rows).to(tl.int32), index_base


@triton.jit
def _load_rows(base, desc, row_offset, first_row, tile_ptrs, USE_TMA: tl.constexpr):
    """The rows of one gathered tile: through the descriptor from `row_offset + first_row` (one
    chunk), or through `tile_ptrs` (offsets from `base`)."""
    if USE_TMA:
        rows = desc.load([row_offset + first_row, 0])
    else:
        rows = tl.load(base + tile_ptrs)
    return rows


@triton.jit
def _kept_tile_scores(q, k_base, k_desc, k_row_offset, index_base, KEY_VALID, first, k_keep, qk_scale_log2, tile,
                      offs_d, HEAD_DIM: tl.constexpr, CHUNK_N: tl.constexpr, HAS_KEY_PAD: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, CHUNKS_PER_TILE: tl.constexpr, USE_TMA: tl.constexpr):
    """One tile of a query chunk's kept key chunks (list slots first .. first + CHUNKS_PER_TILE):
    (log2-scaled scores with missing slots and padding keys at -inf, the keys, their row offsets,
    the tile's first key row)."""
    slot = first + tile // CHUNK_N
    in_list = slot < k_keep
    first_row = tl.load(index_base + first) * CHUNK_N
    k_rows = tl.load(index_base + slot, mask=in_list, other=0) * CHUNK_N + tile % CHUNK_N
    kv_tile = k_rows[:, None] * HEAD_DIM + offs_d[None, :]
    k = _load_rows(k_base, k_desc, k_row_offset, first_row, kv_tile, USE_TMA)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
    if HAS_KEY_PAD:
        in_list = in_list & (tl.load(KEY_VALID + k_rows) != 0)
    if CHUNKS_PER_TILE > 1 or HAS_KEY_PAD:
        s = tl.where(in_list[None, :], s, float("-inf"))
    return s, k, kv_tile, first_row


@triton.autotune(configs=_configs(), key=_TUNE_KEY)
@triton.jit
def bsa_forward_kernel(
    Q, K, V, O, LSE,
    KV_INDEX,  # int32 [B*H, n_q_chunks, k_keep]: kept key chunks per query chunk
    KEY_VALID,  # int8 [n_k_rows]: 0 for padding keys (read only when HAS_KEY_PAD)
    n_q_rows, n_k_rows, k_keep, qk_scale_log2,
    HEAD_DIM: tl.constexpr, CHUNK_M: tl.constexpr, CHUNK_N: tl.constexpr,
    HAS_KEY_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, CHUNKS_PER_TILE: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    TILE_N: tl.constexpr = CHUNKS_PER_TILE * CHUNK_N
    q_chunk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    n_q_chunks = tl.num_programs(0)
    offs_d = tl.arange(0, HEAD_DIM)
    q_rows = q_chunk * CHUNK_M + tl.arange(0, CHUNK_M)
    q_tile = bh * n_q_rows * HEAD_DIM + q_rows[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q + q_tile)
    k_base, v_base, k_desc, v_desc, k_row_offset, index_base = _kept_key_sources(
        K, V, KV_INDEX, bh, q_chunk, n_q_chunks, n_k_rows, k_keep, CHUNK_N, HEAD_DIM, USE_TMA)
    tile = tl.arange(0, TILE_N)

    m_i = tl.full([CHUNK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([CHUNK_M], dtype=tl.float32)
    acc = tl.zeros([CHUNK_M, HEAD_DIM], dtype=tl.float32)
    for first in range(0, k_keep, CHUNKS_PER_TILE):
        s, _, kv_tile, first_row = _kept_tile_scores(
            q, k_base, k_desc, k_row_offset, index_base, KEY_VALID, first, k_keep, qk_scale_log2, tile, offs_d,
            HEAD_DIM, CHUNK_N, HAS_KEY_PAD, DOT_PRECISION, CHUNKS_PER_TILE, USE_TMA)
        # The first chunk of every tile is kept and holds a real key, so m_new is always finite.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_base, v_desc, k_row_offset, first_row, kv_tile, USE_TMA)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(O + q_tile, acc.to(O.dtype.element_ty))
    tl.store(LSE + bh * n_q_rows + q_rows, m_i + tl.math.log2(l_i))


@triton.autotune(configs=_configs(), key=_TUNE_KEY)
@triton.jit
def bsa_backward_dq_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ,
    KV_INDEX, KEY_VALID,
    n_q_rows, n_k_rows, k_keep, qk_scale_log2, sm_scale,
    HEAD_DIM: tl.constexpr, CHUNK_M: tl.constexpr, CHUNK_N: tl.constexpr,
    HAS_KEY_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, CHUNKS_PER_TILE: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """dQ for one query chunk; also writes DELTA = rowsum(dO * O), which the dK/dV pass reads."""
    TILE_N: tl.constexpr = CHUNKS_PER_TILE * CHUNK_N
    q_chunk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    n_q_chunks = tl.num_programs(0)
    offs_d = tl.arange(0, HEAD_DIM)
    q_rows = q_chunk * CHUNK_M + tl.arange(0, CHUNK_M)
    q_tile = bh * n_q_rows * HEAD_DIM + q_rows[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q + q_tile)
    do = tl.load(DO + q_tile)
    delta = tl.sum(tl.load(O + q_tile).to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * n_q_rows + q_rows, delta)
    lse = tl.load(LSE + bh * n_q_rows + q_rows)
    k_base, v_base, k_desc, v_desc, k_row_offset, index_base = _kept_key_sources(
        K, V, KV_INDEX, bh, q_chunk, n_q_chunks, n_k_rows, k_keep, CHUNK_N, HEAD_DIM, USE_TMA)
    tile = tl.arange(0, TILE_N)

    dq = tl.zeros([CHUNK_M, HEAD_DIM], dtype=tl.float32)
    for first in range(0, k_keep, CHUNKS_PER_TILE):
        s, k, kv_tile, first_row = _kept_tile_scores(
            q, k_base, k_desc, k_row_offset, index_base, KEY_VALID, first, k_keep, qk_scale_log2, tile, offs_d,
            HEAD_DIM, CHUNK_N, HAS_KEY_PAD, DOT_PRECISION, CHUNKS_PER_TILE, USE_TMA)
        v = _load_rows(v_base, v_desc, k_row_offset, first_row, kv_tile, USE_TMA)
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)

    tl.store(DQ + q_tile, (dq * sm_scale).to(DQ.dtype.element_ty))


@triton.autotune(configs=_configs(), key=_TUNE_KEY)
@triton.jit
def bsa_backward_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    Q_LIST,  # int32 [B*H, n_q_chunks * k_keep]: query chunks grouped by the key chunk they kept
    Q_LIST_START,  # int32 [B*H, n_k_chunks + 1]: CSR offsets into Q_LIST
    n_q_rows, n_k_rows, q_list_len, qk_scale_log2, sm_scale,
    HEAD_DIM: tl.constexpr, CHUNK_M: tl.constexpr, CHUNK_N: tl.constexpr,
    HAS_KEY_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, CHUNKS_PER_TILE: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """dK and dV for one key chunk, over the query chunks that kept it. Padding keys need no mask:
    their rows are independent of the others and dropped when the gradient leaves chunk order.
    Padding queries contribute nothing either: their dO (and so dP, delta and dS) rows are zero."""
    TILE_M: tl.constexpr = CHUNKS_PER_TILE * CHUNK_M
    k_chunk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    n_k_chunks = tl.num_programs(0)
    offs_d = tl.arange(0, HEAD_DIM)
    k_rows = k_chunk * CHUNK_N + tl.arange(0, CHUNK_N)
    kv_tile = bh * n_k_rows * HEAD_DIM + k_rows[:, None] * HEAD_DIM + offs_d[None, :]
    k = tl.load(K + kv_tile)
    v = tl.load(V + kv_tile)
    q_base = Q + bh * n_q_rows * HEAD_DIM
    do_base = DO + bh * n_q_rows * HEAD_DIM
    q_desc = _chunk_rows_desc(Q, tl.num_programs(1) * n_q_rows, CHUNK_M, HEAD_DIM, USE_TMA)
    do_desc = _chunk_rows_desc(DO, tl.num_programs(1) * n_q_rows, CHUNK_M, HEAD_DIM, USE_TMA)
    q_row_offset = (bh * n_q_rows).to(tl.int32)
    row_stats = bh * n_q_rows
    list_base = Q_LIST + bh * q_list_len
    start_base = Q_LIST_START + bh * (n_k_chunks + 1) + k_chunk
    first = tl.load(start_base)
    last = tl.load(start_base + 1)
    tile = tl.arange(0, TILE_M)

    dk = tl.zeros([CHUNK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([CHUNK_N, HEAD_DIM], dtype=tl.float32)
    for j in range(first, last, CHUNKS_PER_TILE):
        slot = j + tile // CHUNK_M
        in_list = slot < last
        q_rows = tl.load(list_base + slot, mask=in_list, other=0) * CHUNK_M + tile % CHUNK_M
        q_tile = q_rows[:, None] * HEAD_DIM + offs_d[None, :]
        first_row = tl.load(list_base + j) * CHUNK_M
        q = _load_rows(q_base, q_desc, q_row_offset, first_row, q_tile, USE_TMA)
        do = _load_rows(do_base, do_desc, q_row_offset, first_row, q_tile, USE_TMA)
        # +inf log-sum-exp for slots past the list's end zeroes their P, hence their dS
        lse = tl.load(LSE + row_stats + q_rows, mask=in_list, other=float("inf"))
        delta = tl.load(DELTA + row_stats + q_rows)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale_log2
        p_t = tl.math.exp2(s_t - lse[None, :])
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)

    tl.store(DK + kv_tile, (dk * sm_scale).to(DK.dtype.element_ty))
    tl.store(DV + kv_tile, dv.to(DV.dtype.element_ty))


@triton.jit
def bsa_regroup_kernel(
    RASTER, CHUNKS,  # RASTER: [B, H, N, D] with any strides (head dim contiguous); CHUNKS: contiguous
    stride_b, stride_h, stride_n, n_heads, n_chunk_rows,
    grid_t, grid_h, grid_w, chunks_h, chunks_w,
    HEAD_DIM: tl.constexpr, CT: tl.constexpr, CH: tl.constexpr, CW: tl.constexpr, TO_CHUNKS: tl.constexpr,
):
    """Copy one chunk of one (batch, head) between raster order and chunk order
    ([B*H, n_chunks * CHUNK, D]). Rows of a chunk overhanging the grid are zero in chunk order and
    skipped in raster order. A plain copy at memory bandwidth: PyTorch's permute-copy of the same
    9-d view ran at a third of it (2.6 ms per 86,400 x 4096 bf16 tensor on an H200)."""
    CHUNK: tl.constexpr = CT * CH * CW
    chunk = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    within = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, HEAD_DIM)
    t = chunk // (chunks_h * chunks_w) * CT + within // (CH * CW)
    y = chunk // chunks_w % chunks_h * CH + within // CW % CH
    x = chunk % chunks_w * CW + within % CW
    valid = (t < grid_t) & (y < grid_h) & (x < grid_w)
    token = tl.where(valid, (t * grid_h + y) * grid_w + x, 0).to(tl.int64)
    raster = RASTER + b * stride_b + h * stride_h + token[:, None] * stride_n + offs_d[None, :]
    rows = bh.to(tl.int64) * n_chunk_rows + chunk * CHUNK + within
    chunked = CHUNKS + rows[:, None] * HEAD_DIM + offs_d[None, :]
    if TO_CHUNKS:
        tl.store(chunked, tl.load(raster, mask=valid[:, None], other=0.0))
    else:
        tl.store(raster, tl.load(chunked), mask=valid[:, None])
