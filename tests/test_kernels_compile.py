"""The Triton kernels compile for Hopper (sm_90) on a machine without a GPU.

The CPU tests run kernels in Triton's interpreter, which executes the Python and so accepts code
that the compiler rejects (e.g. a descriptor helper with two returns). Compiling ahead of time, to PTX
and through the ptxas that ships with Triton, catches that here.
"""

from __future__ import annotations

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from longcat_train.model import bsa_kernels

HOPPER = GPUTarget("cuda", 90, 32)
COMMON = dict(n_q_rows="i32", n_k_rows="i32", n_heads="i32", qk_scale_log2="fp32")
SIGNATURES = {
    "bsa_forward_kernel": dict(Q="*bf16", K="*bf16", V="*bf16", O="*bf16", LSE="*fp32", KV_INDEX="*i32",
                               N_FULL="*i32", Q_TOKENS="*i32", K_REAL="*i32", SEGMENTS="*i32", segment_stride="i32",
                               n_q_tokens="i32", k_keep="i32", **COMMON),
    "bsa_backward_dq_kernel": dict(Q="*bf16", K="*bf16", V="*bf16", DO="*bf16",
                                   LSE="*fp32", DELTA="*fp32", DQ="*bf16", KV_INDEX="*i32", N_FULL="*i32",
                                   Q_TOKENS="*i32", K_REAL="*i32", SEGMENTS="*i32", segment_stride="i32",
                                   n_q_tokens="i32", k_keep="i32",
                                   sm_scale="fp32", **COMMON),
    "bsa_backward_dkdv_kernel": dict(Q="*bf16", K="*bf16", V="*bf16", DO="*bf16", LSE="*fp32", DELTA="*fp32",
                                     DK="*bf16", DV="*bf16", Q_LIST="*i32", Q_LIST_START="*i32", K_ORDER="*i32",
                                     K_TOKENS="*i32", n_k_tokens="i32", q_list_len="i32", sm_scale="fp32", **COMMON),
}
BSA_HELPER_KERNELS = {  # name: (signature, constants)
    "bsa_regroup_kernel": (dict(RASTER="*bf16", CHUNKS="*bf16", TOKENS="*i32", stride_b="i64", stride_h="i64",
                                stride_n="i64", n_heads="i32", n_chunk_rows="i32", POOLED="*fp32", O="*bf16",
                                o_stride_b="i64", o_stride_h="i64", o_stride_n="i64", DELTA="*fp32"), dict(HEAD_DIM=128, CHUNK=64, POOL=True, DELTA_OF_O=True)),
    "bsa_topk_kernel": (dict(SCORES="*fp32", K_REAL="*i32", KV_INDEX="*i32", N_FULL="*i32", n_cols="i32",
                             keep="i32", chunk_rows="i32"), dict(BLOCK=2048)),
    "bsa_gate_scores_kernel": (dict(POOLED_Q="*fp32", POOLED_K="*fp32", SCORES="*fp32", n_q_chunks="i32",
                                    n_k_chunks="i32", head_dim="i32"), dict(BLOCK=64, BLOCK_D=128)),
}


# Integer arguments that are multiples of 16 at 720p (row counts are whole 64-row chunks), which
# Triton's launcher marks so, as it marks 16-byte aligned pointers: without these marks the
# compiler does not turn pointer loads into asynchronous copies, unlike at run time.
DIVISIBLE_INTS = {"n_q_rows", "n_k_rows", "n_heads", "n_q_tokens", "n_k_tokens"}


def _compile(fn, signature, constants, **options):
    """PTX and machine code for sm_90 of a Triton kernel (checking the signature names every argument),
    specialised like a run-time launch: pointers and `DIVISIBLE_INTS` divisible by 16."""
    signature = signature | {key: "constexpr" for key in constants}
    assert set(signature) == set(fn.arg_names)
    divisible = [fn.arg_names.index(key) for key, kind in signature.items()
                 if kind.startswith("*") or key in DIVISIBLE_INTS]
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(key),): value for key, value in constants.items()},
                       attrs={(index,): [["tt.divisibility", 16]] for index in divisible})
    return triton.compile(source, target=HOPPER, options=options)


@pytest.mark.parametrize("stages", sorted({c.num_stages for c in bsa_kernels._configs()} | {2}))
@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_bsa_kernel_compiles_for_hopper(name, stages):
    if bsa_kernels.triton_interpreting():
        pytest.skip("the interpreter is on in this process")
    constants = dict(HEAD_DIM=128, CHUNK_M=64, CHUNK_N=64, HAS_KEY_PAD=True, DOT_PRECISION="tf32")
    if "KEEP_BLOCK" in getattr(bsa_kernels, name).fn.arg_names:
        constants["KEEP_BLOCK"] = 128  # 90 kept chunks at 720p
    compiled = _compile(getattr(bsa_kernels, name).fn, SIGNATURES[name], constants, num_warps=4, num_stages=stages)
    ptx = compiled.asm["ptx"]
    assert "wgmma" in ptx and "cp.async.bulk.tensor" in ptx  # Hopper tensor cores fed by the copy engine


@pytest.mark.parametrize("name", sorted(BSA_HELPER_KERNELS))
def test_bsa_helper_kernel_compiles_for_hopper(name):
    signature, constants = BSA_HELPER_KERNELS[name]
    assert "st.global" in _compile(getattr(bsa_kernels, name), signature, constants, num_warps=4).asm["ptx"]


FUSED_OP_KERNELS = {  # name: (signature, constants)
    "_ln_scale_shift_fwd": (dict(X="*bf16", A="*fp32", Bias="*fp32", Y="*bf16", C="i32", tokens="i32",
                                 tokens_per_row="i32", params_per_batch="i32", eps="fp32"), dict(BLOCK_C=4096)),
    "_ln_scale_shift_bwd": (dict(X="*bf16", A="*fp32", DY="*bf16", DX="*bf16", C="i32", tokens="i32",
                                 tokens_per_row="i32", params_per_batch="i32", eps="fp32"), dict(BLOCK_C=4096)),
    "_rms_rope_fwd": (dict(X="*bf16", W="*bf16", COS="*fp32", SIN="*fp32", Y="*bf16", rows="i32", heads="i32",
                           tokens="i32", s_b="i32", s_h="i32", s_n="i32", o_b="i32", o_h="i32", o_n="i32", eps="fp32"),
                      dict(D=128, HAS_ROPE=True, BLOCK_R=16, TOKEN_MAJOR=True)),
    "_rms_rope_bwd": (dict(X="*bf16", W="*bf16", COS="*fp32", SIN="*fp32", DY="*bf16", DX="*bf16", rows="i32",
                           heads="i32", tokens="i32", s_b="i32", s_h="i32", s_n="i32", g_b="i32", g_h="i32",
                           g_n="i32", o_b="i32", o_h="i32", o_n="i32", eps="fp32"),
                      dict(D=128, HAS_ROPE=True, BLOCK_R=16, TOKEN_MAJOR=True)),
    "_gate_kernel": (dict(X="*bf16", Y="*bf16", G="*fp32", OUT="*bf16", C="i32", tokens="i32", tokens_per_row="i32",
                          params_per_batch="i32"), dict(HAS_X=True, BLOCK_C=4096)),
}


@pytest.mark.parametrize("name", sorted(FUSED_OP_KERNELS))
def test_fused_op_kernel_compiles_for_hopper(name):
    from longcat_train.model import fused_ops

    signature, constants = FUSED_OP_KERNELS[name]
    assert "st.global" in _compile(getattr(fused_ops, name), signature, constants, num_warps=4).asm["ptx"]


def test_every_autotuned_kernel_keeps_its_tuning_on_disk() -> None:
    # a GPU run after the first must not benchmark the launch configurations again
    tuned = {name: kernel for name, kernel in vars(bsa_kernels).items()
             if isinstance(kernel, triton.runtime.autotuner.Autotuner)}
    assert set(tuned) == set(SIGNATURES)
    if bsa_kernels.triton_interpreting():
        pytest.skip("the interpreter never tunes, so Triton turns the disk cache off")
    assert all(kernel.cache_results for kernel in tuned.values())
