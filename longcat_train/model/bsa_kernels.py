"""Triton kernels for block-sparse attention (see ``bsa.py`` for the semantics and the wrapper).

The kernels read q, k, v and write the output and gradients in the caller's raster token order and
memory layout (any strides with a contiguous head dimension, e.g. the transformer's token-major
``[B, N, heads, D]`` storage seen as ``[B, heads, N, D]``). A 3D chunk's tokens are found by index
arithmetic on the token grid, so nothing is regrouped or padded in memory: chunks that overhang the
grid simply have invalid rows, which are never stored, get no attention weight as keys and have their
log-sum-exp set to +inf as queries (so every backward term of theirs is exactly zero).

Scores are kept in log2 units (pre-multiplied by ``sm_scale * log2(e)``) so the kernels can use
``exp2``; the saved log-sum-exp ``LSE`` and ``DELTA`` are per (batch*head, chunk-order row).

A tile holds ``CHUNKS_PER_TILE`` chunks (autotuned: two 64-token chunks make 128-wide tiles, which
keep Hopper's tensor cores busier than 64-wide ones); a remainder tile masks its missing chunks.

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


def _configs() -> list[triton.Config]:
    """Launch shapes for 64-token chunks with head_dim up to 128 on sm_90.

    Under the interpreter one config (two chunks per tile, so remainder tiles are exercised) is
    enough; the autotuner skips benchmarking then.
    """
    if triton_interpreting():
        return [triton.Config({"CHUNKS_PER_TILE": 2}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"CHUNKS_PER_TILE": per_tile}, num_warps=warps, num_stages=stages)
        for per_tile in (1, 2)
        for warps in (4, 8)
        for stages in (2, 3, 4)
    ]


_TUNE_KEY = ["HEAD_DIM", "CT_Q", "CH_Q", "CW_Q", "CT_K", "CH_K", "CW_K", "DOT_PRECISION"]


@triton.jit
def _chunk_rows(chunk, within, n_h, n_w, T, H, W, CT: tl.constexpr, CH: tl.constexpr, CW: tl.constexpr):
    """Raster token index and validity of row ``within`` of 3D chunk ``chunk`` (row-major chunks
    over an (n_t, n_h, n_w) chunk grid, row-major (t, h, w) rows inside a chunk). Invalid rows (the
    chunk overhangs the grid) get index 0 so that loads stay in bounds."""
    t = chunk // (n_h * n_w) * CT + within // (CH * CW)
    h = chunk // n_w % n_h * CH + within // CW % CH
    w = chunk % n_w * CW + within % CW
    valid = (t < T) & (h < H) & (w < W)
    return tl.where(valid, (t * H + h) * W + w, 0), valid


@triton.autotune(configs=_configs(), key=_TUNE_KEY)
@triton.jit
def bsa_forward_kernel(
    Q, K, V, O, LSE,
    KV_INDEX,  # int32 [B*H, n_q_chunks, k_keep]: kept key chunks per query chunk
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_ob, stride_oh, stride_on,
    n_heads, k_keep, qk_scale_log2,
    grid_q_t, grid_q_h, grid_q_w, chunks_q_h, chunks_q_w,
    grid_k_t, grid_k_h, grid_k_w, chunks_k_h, chunks_k_w,
    HEAD_DIM: tl.constexpr, CT_Q: tl.constexpr, CH_Q: tl.constexpr, CW_Q: tl.constexpr,
    CT_K: tl.constexpr, CH_K: tl.constexpr, CW_K: tl.constexpr,
    HAS_Q_PAD: tl.constexpr, HAS_K_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    CHUNKS_PER_TILE: tl.constexpr,
):
    CHUNK_M: tl.constexpr = CT_Q * CH_Q * CW_Q
    CHUNK_N: tl.constexpr = CT_K * CH_K * CW_K
    TILE_N: tl.constexpr = CHUNKS_PER_TILE * CHUNK_N
    q_chunk = tl.program_id(0)
    bh = tl.program_id(1)
    n_q_chunks = tl.num_programs(0)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)

    q_rows, q_valid = _chunk_rows(q_chunk, tl.arange(0, CHUNK_M), chunks_q_h, chunks_q_w,
                                  grid_q_t, grid_q_h, grid_q_w, CT_Q, CH_Q, CW_Q)
    q = tl.load(Q + b * stride_qb + h * stride_qh + q_rows[:, None].to(tl.int64) * stride_qn + offs_d[None, :])
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_kb + h * stride_kh
    index_base = KV_INDEX + (bh.to(tl.int64) * n_q_chunks + q_chunk) * k_keep
    tile = tl.arange(0, TILE_N)
    tile_slot = tile // CHUNK_N
    tile_within = tile % CHUNK_N

    m_i = tl.full([CHUNK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([CHUNK_M], dtype=tl.float32)
    acc = tl.zeros([CHUNK_M, HEAD_DIM], dtype=tl.float32)
    for first in range(0, k_keep, CHUNKS_PER_TILE):
        slot = first + tile_slot
        in_list = slot < k_keep
        k_chunk = tl.load(index_base + slot, mask=in_list, other=0)
        k_rows, k_valid = _chunk_rows(k_chunk, tile_within, chunks_k_h, chunks_k_w,
                                      grid_k_t, grid_k_h, grid_k_w, CT_K, CH_K, CW_K)
        kv_tile = k_rows[:, None].to(tl.int64) * stride_kn + offs_d[None, :]
        k = tl.load(k_base + kv_tile)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        if CHUNKS_PER_TILE > 1 or HAS_K_PAD:
            s = tl.where((in_list & k_valid)[None, :], s, float("-inf"))
        # The first chunk of every tile is kept and holds a real key, so m_new is always finite.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + kv_tile)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    o_tile = O + b * stride_ob + h * stride_oh + q_rows[:, None].to(tl.int64) * stride_on + offs_d[None, :]
    lse = m_i + tl.math.log2(l_i)
    stats = LSE + bh.to(tl.int64) * n_q_chunks * CHUNK_M + q_chunk * CHUNK_M + tl.arange(0, CHUNK_M)
    if HAS_Q_PAD:
        tl.store(o_tile, acc.to(O.dtype.element_ty), mask=q_valid[:, None])
        lse = tl.where(q_valid, lse, float("inf"))  # zero weight for padding rows in backward
    else:
        tl.store(o_tile, acc.to(O.dtype.element_ty))
    tl.store(stats, lse)


@triton.autotune(configs=_configs(), key=_TUNE_KEY)
@triton.jit
def bsa_backward_dq_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ,
    KV_INDEX,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_ob, stride_oh, stride_on,
    stride_dob, stride_doh, stride_don,
    n_heads, k_keep, qk_scale_log2, sm_scale,
    grid_q_t, grid_q_h, grid_q_w, chunks_q_h, chunks_q_w,
    grid_k_t, grid_k_h, grid_k_w, chunks_k_h, chunks_k_w,
    HEAD_DIM: tl.constexpr, CT_Q: tl.constexpr, CH_Q: tl.constexpr, CW_Q: tl.constexpr,
    CT_K: tl.constexpr, CH_K: tl.constexpr, CW_K: tl.constexpr,
    HAS_Q_PAD: tl.constexpr, HAS_K_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    CHUNKS_PER_TILE: tl.constexpr,
):
    """dQ for one query chunk; also writes DELTA = rowsum(dO * O), which the dK/dV pass reads.
    DQ has O's strides."""
    CHUNK_M: tl.constexpr = CT_Q * CH_Q * CW_Q
    CHUNK_N: tl.constexpr = CT_K * CH_K * CW_K
    TILE_N: tl.constexpr = CHUNKS_PER_TILE * CHUNK_N
    q_chunk = tl.program_id(0)
    bh = tl.program_id(1)
    n_q_chunks = tl.num_programs(0)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)

    q_rows, q_valid = _chunk_rows(q_chunk, tl.arange(0, CHUNK_M), chunks_q_h, chunks_q_w,
                                  grid_q_t, grid_q_h, grid_q_w, CT_Q, CH_Q, CW_Q)
    rows64 = q_rows[:, None].to(tl.int64)
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows64 * stride_qn + offs_d[None, :])
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows64 * stride_don + offs_d[None, :])
    o_tile = b * stride_ob + h * stride_oh + rows64 * stride_on + offs_d[None, :]
    o = tl.load(O + o_tile)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    stats = bh.to(tl.int64) * n_q_chunks * CHUNK_M + q_chunk * CHUNK_M + tl.arange(0, CHUNK_M)
    tl.store(DELTA + stats, delta)
    lse = tl.load(LSE + stats)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_kb + h * stride_kh
    index_base = KV_INDEX + (bh.to(tl.int64) * n_q_chunks + q_chunk) * k_keep
    tile = tl.arange(0, TILE_N)
    tile_slot = tile // CHUNK_N
    tile_within = tile % CHUNK_N

    dq = tl.zeros([CHUNK_M, HEAD_DIM], dtype=tl.float32)
    for first in range(0, k_keep, CHUNKS_PER_TILE):
        slot = first + tile_slot
        in_list = slot < k_keep
        k_chunk = tl.load(index_base + slot, mask=in_list, other=0)
        k_rows, k_valid = _chunk_rows(k_chunk, tile_within, chunks_k_h, chunks_k_w,
                                      grid_k_t, grid_k_h, grid_k_w, CT_K, CH_K, CW_K)
        kv_tile = k_rows[:, None].to(tl.int64) * stride_kn + offs_d[None, :]
        k = tl.load(k_base + kv_tile)
        v = tl.load(v_base + kv_tile)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        if CHUNKS_PER_TILE > 1 or HAS_K_PAD:
            s = tl.where((in_list & k_valid)[None, :], s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)

    dq = (dq * sm_scale).to(DQ.dtype.element_ty)
    if HAS_Q_PAD:
        tl.store(DQ + o_tile, dq, mask=q_valid[:, None])
    else:
        tl.store(DQ + o_tile, dq)


@triton.autotune(configs=_configs(), key=_TUNE_KEY)
@triton.jit
def bsa_backward_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    Q_LIST,  # int32 [B*H, n_q_chunks * k_keep]: query chunks grouped by the key chunk they kept
    Q_LIST_START,  # int32 [B*H, n_k_chunks + 1]: CSR offsets into Q_LIST
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn,
    n_heads, n_q_chunks, q_list_len, qk_scale_log2, sm_scale,
    grid_q_t, grid_q_h, grid_q_w, chunks_q_h, chunks_q_w,
    grid_k_t, grid_k_h, grid_k_w, chunks_k_h, chunks_k_w,
    HEAD_DIM: tl.constexpr, CT_Q: tl.constexpr, CH_Q: tl.constexpr, CW_Q: tl.constexpr,
    CT_K: tl.constexpr, CH_K: tl.constexpr, CW_K: tl.constexpr,
    HAS_Q_PAD: tl.constexpr, HAS_K_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    CHUNKS_PER_TILE: tl.constexpr,
):
    """dK and dV for one key chunk, over the query chunks that kept it (DK and DV share strides).
    Padding keys need no mask: their rows of dK/dV are computed but never stored, and every other
    row is independent of them."""
    CHUNK_M: tl.constexpr = CT_Q * CH_Q * CW_Q
    CHUNK_N: tl.constexpr = CT_K * CH_K * CW_K
    TILE_M: tl.constexpr = CHUNKS_PER_TILE * CHUNK_M
    k_chunk = tl.program_id(0)
    bh = tl.program_id(1)
    n_k_chunks = tl.num_programs(0)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)

    k_rows, k_valid = _chunk_rows(k_chunk, tl.arange(0, CHUNK_N), chunks_k_h, chunks_k_w,
                                  grid_k_t, grid_k_h, grid_k_w, CT_K, CH_K, CW_K)
    kv_tile = b * stride_kb + h * stride_kh + k_rows[:, None].to(tl.int64) * stride_kn + offs_d[None, :]
    k = tl.load(K + kv_tile)
    v = tl.load(V + kv_tile)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    stats_base = bh.to(tl.int64) * n_q_chunks * CHUNK_M
    list_base = Q_LIST + bh.to(tl.int64) * q_list_len
    start_base = Q_LIST_START + bh.to(tl.int64) * (n_k_chunks + 1) + k_chunk
    first = tl.load(start_base)
    last = tl.load(start_base + 1)
    tile = tl.arange(0, TILE_M)
    tile_slot = tile // CHUNK_M
    tile_within = tile % CHUNK_M

    dk = tl.zeros([CHUNK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([CHUNK_N, HEAD_DIM], dtype=tl.float32)
    for j in range(first, last, CHUNKS_PER_TILE):
        slot = j + tile_slot
        in_list = slot < last
        q_chunk = tl.load(list_base + slot, mask=in_list, other=0)
        q_rows, _ = _chunk_rows(q_chunk, tile_within, chunks_q_h, chunks_q_w,
                                grid_q_t, grid_q_h, grid_q_w, CT_Q, CH_Q, CW_Q)
        rows64 = q_rows[:, None].to(tl.int64)
        q = tl.load(q_base + rows64 * stride_qn + offs_d[None, :])
        do = tl.load(do_base + rows64 * stride_don + offs_d[None, :])
        stats = stats_base + q_chunk * CHUNK_M + tile_within
        # +inf log-sum-exp (padding queries, and slots past the list's end) zeroes P, hence dS
        lse = tl.load(LSE + stats, mask=in_list, other=float("inf"))
        delta = tl.load(DELTA + stats, mask=in_list, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale_log2
        p_t = tl.math.exp2(s_t - lse[None, :])
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)

    dk_tile = b * stride_dkb + h * stride_dkh + k_rows[:, None].to(tl.int64) * stride_dkn + offs_d[None, :]
    dk = (dk * sm_scale).to(DK.dtype.element_ty)
    dv = dv.to(DV.dtype.element_ty)
    if HAS_K_PAD:
        tl.store(DK + dk_tile, dk, mask=k_valid[:, None])
        tl.store(DV + dk_tile, dv, mask=k_valid[:, None])
    else:
        tl.store(DK + dk_tile, dk)
        tl.store(DV + dk_tile, dv)
