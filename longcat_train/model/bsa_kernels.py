"""Triton kernels for block-sparse attention (see ``bsa.py`` for the semantics and the wrapper).

All kernels work on tensors already regrouped into block order: ``[B*H, n_blocks * BLOCK, HEAD_DIM]``
contiguous, so token block ``b`` of a (batch, head) is rows ``b*BLOCK .. (b+1)*BLOCK``. Scores are
kept in log2 units (pre-multiplied by ``sm_scale * log2(e)``) so the kernels can use ``exp2``; the
saved log-sum-exp ``LSE`` is in the same units.

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


def _light_configs() -> list[triton.Config]:
    """A handful of launch shapes for a 64/128-token block with head_dim up to 128 on sm_90.

    Under the interpreter one config is enough (the autotuner skips benchmarking then).
    """
    if triton_interpreting():
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [
        triton.Config({}, num_warps=warps, num_stages=stages)
        for warps in (4, 8)
        for stages in (2, 3)
    ]


_TUNE_KEY = ["HEAD_DIM", "BLOCK_M", "BLOCK_N", "DOT_PRECISION"]


@triton.autotune(configs=_light_configs(), key=_TUNE_KEY)
@triton.jit
def bsa_forward_kernel(
    Q, K, V, O, LSE,
    KV_INDEX,  # int32 [B*H, n_q_blocks, k_keep]: kept key blocks per query block
    KEY_VALID,  # int8 [n_k_tokens]: 0 for padding keys (read only when HAS_KEY_PAD)
    n_q_tokens, n_k_tokens, k_keep, qk_scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KEY_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    q_block = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    n_q_blocks = tl.num_programs(0)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    q_rows = q_block * BLOCK_M + offs_m
    q_tile = bh * n_q_tokens * HEAD_DIM + q_rows[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q + q_tile)
    k_base = K + bh * n_k_tokens * HEAD_DIM
    v_base = V + bh * n_k_tokens * HEAD_DIM
    index_base = KV_INDEX + (bh * n_q_blocks + q_block) * k_keep

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for i in range(k_keep):
        k_rows = tl.load(index_base + i) * BLOCK_N + offs_n
        kv_tile = k_rows[:, None] * HEAD_DIM + offs_d[None, :]
        k = tl.load(k_base + kv_tile)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        if HAS_KEY_PAD:
            valid = tl.load(KEY_VALID + k_rows) != 0
            s = tl.where(valid[None, :], s, float("-inf"))
        # Every block holds at least one real key, so m_new is finite from the first block on.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + kv_tile)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(O + q_tile, acc.to(O.dtype.element_ty))
    tl.store(LSE + bh * n_q_tokens + q_rows, m_i + tl.math.log2(l_i))


@triton.jit
def bsa_backward_delta_kernel(O, DO, DELTA, n_rows, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """delta = rowsum(dO * O) in fp32: the softmax-gradient correction term."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = rows < n_rows
    tile = rows[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    o = tl.load(O + tile, mask=in_range[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + tile, mask=in_range[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + rows, tl.sum(o * do, 1), mask=in_range)


@triton.autotune(configs=_light_configs(), key=_TUNE_KEY)
@triton.jit
def bsa_backward_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    KV_INDEX, KEY_VALID,
    n_q_tokens, n_k_tokens, k_keep, qk_scale_log2, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KEY_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    q_block = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    n_q_blocks = tl.num_programs(0)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    q_rows = q_block * BLOCK_M + offs_m
    q_tile = bh * n_q_tokens * HEAD_DIM + q_rows[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q + q_tile)
    do = tl.load(DO + q_tile)
    lse = tl.load(LSE + bh * n_q_tokens + q_rows)
    delta = tl.load(DELTA + bh * n_q_tokens + q_rows)
    k_base = K + bh * n_k_tokens * HEAD_DIM
    v_base = V + bh * n_k_tokens * HEAD_DIM
    index_base = KV_INDEX + (bh * n_q_blocks + q_block) * k_keep

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for i in range(k_keep):
        k_rows = tl.load(index_base + i) * BLOCK_N + offs_n
        kv_tile = k_rows[:, None] * HEAD_DIM + offs_d[None, :]
        k = tl.load(k_base + kv_tile)
        v = tl.load(v_base + kv_tile)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        p = tl.math.exp2(s - lse[:, None])
        if HAS_KEY_PAD:
            valid = tl.load(KEY_VALID + k_rows) != 0
            p = tl.where(valid[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)

    tl.store(DQ + q_tile, (dq * sm_scale).to(DQ.dtype.element_ty))


@triton.autotune(configs=_light_configs(), key=_TUNE_KEY)
@triton.jit
def bsa_backward_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    Q_LIST,  # int32 [B*H, n_q_blocks * k_keep]: query blocks grouped by the key block they kept
    Q_LIST_START,  # int32 [B*H, n_k_blocks + 1]: CSR offsets into Q_LIST
    KEY_VALID,
    n_q_tokens, n_k_tokens, q_list_len, qk_scale_log2, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KEY_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    k_block = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    n_k_blocks = tl.num_programs(0)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    k_rows = k_block * BLOCK_N + offs_n
    kv_tile = bh * n_k_tokens * HEAD_DIM + k_rows[:, None] * HEAD_DIM + offs_d[None, :]
    k = tl.load(K + kv_tile)
    v = tl.load(V + kv_tile)
    if HAS_KEY_PAD:
        valid = tl.load(KEY_VALID + k_rows) != 0
    q_base = Q + bh * n_q_tokens * HEAD_DIM
    do_base = DO + bh * n_q_tokens * HEAD_DIM
    row_stats = bh * n_q_tokens
    list_base = Q_LIST + bh * q_list_len
    start_base = Q_LIST_START + bh * (n_k_blocks + 1) + k_block
    first = tl.load(start_base)
    last = tl.load(start_base + 1)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for j in range(first, last):
        q_rows = tl.load(list_base + j) * BLOCK_M + offs_m
        q_tile = q_rows[:, None] * HEAD_DIM + offs_d[None, :]
        q = tl.load(q_base + q_tile)
        do = tl.load(do_base + q_tile)
        lse = tl.load(LSE + row_stats + q_rows)
        delta = tl.load(DELTA + row_stats + q_rows)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale_log2
        p_t = tl.math.exp2(s_t - lse[None, :])
        if HAS_KEY_PAD:
            p_t = tl.where(valid[:, None], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)

    tl.store(DK + kv_tile, (dk * sm_scale).to(DK.dtype.element_ty))
    tl.store(DV + kv_tile, dv.to(DV.dtype.element_ty))
