"""The Triton kernels compile for Hopper (sm_90) on a machine without a GPU.

The CPU tests run kernels in Triton's interpreter, which executes the Python and so accepts code
that the compiler rejects (a descriptor helper with two returns once passed every CPU test and failed
on the H200). Compiling ahead of time, to PTX and through the ptxas that ships with Triton, catches that here.
"""

from __future__ import annotations

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from longcat_train.model import bsa_kernels

HOPPER = GPUTarget("cuda", 90, 32)
COMMON = dict(n_q_rows="i32", n_k_rows="i32", qk_scale_log2="fp32")
SIGNATURES = {
    "bsa_forward_kernel": dict(Q="*bf16", K="*bf16", V="*bf16", O="*bf16", LSE="*fp32", KV_INDEX="*i32",
                               KEY_VALID="*i8", k_keep="i32", **COMMON),
    "bsa_backward_dq_kernel": dict(Q="*bf16", K="*bf16", V="*bf16", O="*bf16", DO="*bf16", LSE="*fp32",
                                   DELTA="*fp32", DQ="*bf16", KV_INDEX="*i32", KEY_VALID="*i8", k_keep="i32",
                                   sm_scale="fp32", **COMMON),
    "bsa_backward_dkdv_kernel": dict(Q="*bf16", K="*bf16", V="*bf16", DO="*bf16", LSE="*fp32", DELTA="*fp32",
                                     DK="*bf16", DV="*bf16", Q_LIST="*i32", Q_LIST_START="*i32", q_list_len="i32",
                                     sm_scale="fp32", **COMMON),
}
# one launch shape per code path the autotuner chooses between
PATHS = [dict(CHUNKS_PER_TILE=1, USE_TMA=False), dict(CHUNKS_PER_TILE=2, USE_TMA=False),
         dict(CHUNKS_PER_TILE=1, USE_TMA=True)]


def test_every_autotuned_path_is_offered_on_the_gpu():
    offered = {(c.kwargs["CHUNKS_PER_TILE"], c.kwargs["USE_TMA"]) for c in bsa_kernels._configs()}
    assert offered == {(p["CHUNKS_PER_TILE"], p["USE_TMA"]) for p in PATHS}


@pytest.mark.parametrize("path", PATHS, ids=lambda p: f"tile{p['CHUNKS_PER_TILE']}-{'tma' if p['USE_TMA'] else 'ptr'}")
@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_bsa_kernel_compiles_for_hopper(name, path):
    if bsa_kernels.triton_interpreting():
        pytest.skip("the interpreter is on in this process")
    fn = getattr(bsa_kernels, name).fn
    constants = dict(HEAD_DIM=128, CHUNK_M=64, CHUNK_N=64, HAS_KEY_PAD=True, DOT_PRECISION="tf32", **path)
    signature = SIGNATURES[name] | {key: "constexpr" for key in constants}
    assert set(signature) == set(fn.arg_names)
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(key),): value for key, value in constants.items()})
    compiled = triton.compile(source, target=HOPPER, options={"num_warps": 4, "num_stages": 2})
    assert "wgmma" in compiled.asm["ptx"]  # Hopper tensor-core instructions, not a fallback


FUSED_OP_KERNELS = {  # name: (signature, constants)
    "_ln_scale_shift_fwd": (dict(X="*bf16", A="*fp32", Bias="*fp32", Y="*bf16", C="i32", tokens="i32",
                                 tokens_per_row="i32", params_per_batch="i32", eps="fp32"), dict(BLOCK_C=4096)),
    "_ln_scale_shift_bwd": (dict(X="*bf16", A="*fp32", DY="*bf16", DX="*bf16", C="i32", tokens="i32",
                                 tokens_per_row="i32", params_per_batch="i32", eps="fp32"), dict(BLOCK_C=4096)),
    "_rms_rope_fwd": (dict(X="*bf16", W="*bf16", COS="*fp32", SIN="*fp32", Y="*bf16", rows="i32", heads="i32",
                           tokens="i32", s_b="i32", s_h="i32", s_n="i32", o_b="i32", o_h="i32", o_n="i32", eps="fp32"),
                      dict(D=128, HAS_ROPE=True, BLOCK_R=16)),
    "_rms_rope_bwd": (dict(X="*bf16", W="*bf16", COS="*fp32", SIN="*fp32", DY="*bf16", DX="*bf16", rows="i32",
                           heads="i32", tokens="i32", s_b="i32", s_h="i32", s_n="i32", g_b="i32", g_h="i32",
                           g_n="i32", o_b="i32", o_h="i32", o_n="i32", eps="fp32"), dict(D=128, HAS_ROPE=True, BLOCK_R=16)),
    "_gate_kernel": (dict(X="*bf16", Y="*bf16", G="*fp32", OUT="*bf16", C="i32", tokens="i32", tokens_per_row="i32",
                          params_per_batch="i32"), dict(HAS_X=True, BLOCK_C=4096)),
}


@pytest.mark.parametrize("name", sorted(FUSED_OP_KERNELS))
def test_fused_op_kernel_compiles_for_hopper(name):
    from longcat_train.model import fused_ops

    fn = getattr(fused_ops, name)
    signature, constants = FUSED_OP_KERNELS[name]
    signature = signature | {key: "constexpr" for key in constants}
    assert set(signature) == set(fn.arg_names)
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(key),): value for key, value in constants.items()})
    assert "st.global" in triton.compile(source, target=HOPPER, options={"num_warps": 4}).asm["ptx"]
