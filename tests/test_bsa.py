"""Block-sparse attention: layout, selection, the dense reference, and the Triton kernels.

The kernels run on CPU through Triton's interpreter, which must be switched on before triton is
imported. Another test module may already have imported triton (and our kernels) normally, so the
kernel checks run in one fresh subprocess (this file executed as a script) and report their errors
as JSON; the tests below assert on that report. The interpreter cannot check bfloat16 (its tl.dot
multiplies bf16 bit patterns, triton-lang/triton#11584), so float16 stands in for the 16-bit path.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = {"float32": 1e-4, "float16": 2e-3}

# name: (dtype, batch, heads, head_dim, latent_q, latent_k, sparsity, chunk_q, chunk_k, layout)
# layout: "contiguous" [B, heads, N, D]; "token_major" a [B, N, heads, D] tensor seen as
# [B, heads, N, D] (the transformer's layout); "token_major_slice" the same, q starting 16 tokens
# into its storage (the transformer's condition-frame split).
KERNEL_CASES: dict[str, tuple[Any, ...]] = {
    "divisible": ("float32", 1, 2, 16, (4, 8, 8), (4, 8, 8), 0.5, (4, 4, 4), (4, 4, 4), "contiguous"),
    "padded_batch2": ("float32", 2, 2, 32, (5, 6, 10), (5, 6, 10), 0.5, (4, 4, 4), (4, 4, 4), "token_major"),
    "more_keys_than_queries": ("float32", 1, 2, 16, (4, 8, 8), (8, 8, 8), 0.75, (4, 4, 4), (4, 4, 4), "contiguous"),
    "more_keys_padded": ("float32", 1, 2, 16, (3, 6, 10), (5, 6, 10), 0.6, (4, 4, 4), (4, 4, 4), "token_major_slice"),
    "chunk_128_keys": ("float32", 1, 2, 16, (4, 8, 8), (4, 8, 16), 0.5, (4, 4, 4), (4, 4, 8), "contiguous"),
    "dense_padded": ("float32", 1, 2, 16, (5, 6, 10), (5, 6, 10), 0.0, (4, 4, 4), (4, 4, 4), "contiguous"),
    "padded_float16": ("float16", 1, 2, 32, (5, 6, 10), (5, 6, 10), 0.5, (4, 4, 4), (4, 4, 4), "contiguous"),
    "odd_keep": ("float32", 1, 2, 16, (5, 6, 10), (5, 6, 10), 0.55, (4, 4, 4), (4, 4, 4), "token_major"),
    "chunk_16_slice": ("float32", 2, 2, 16, (3, 6, 8), (4, 6, 8), 0.55, (2, 2, 4), (2, 2, 4), "token_major_slice"),
}


def _case_tensor(shape: tuple[int, ...], layout: str, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    batch, heads, n, dim = shape
    if layout == "contiguous":
        return torch.randn(shape, generator=gen).to(dtype).requires_grad_()
    skip = 16 if layout == "token_major_slice" else 0
    storage = torch.randn(batch, skip + n, heads, dim, generator=gen).to(dtype)
    return storage.transpose(1, 2)[:, :, skip:].requires_grad_()


def _run_kernel_case(name: str) -> dict[str, float]:
    """Kernel vs. the masked dense float32 reference (same selection), plus vs. plain SDPA."""
    from longcat_train.model.bsa import (
        block_sparse_attention,
        block_sparse_attention_reference,
        select_kv_blocks,
    )

    dtype, batch, heads, dim, latent_q, latent_k, sparsity, chunk_q, chunk_k, layout = KERNEL_CASES[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    q, k, v = (
        _case_tensor((batch, heads, math.prod(shape), dim), layout, getattr(torch, dtype), gen)
        for shape in (latent_q, latent_k, latent_k)
    )
    args = (latent_q, latent_k, sparsity, chunk_q, chunk_k)
    grad_out = torch.randn(batch, heads, q.shape[2], dim, generator=gen).to(q.dtype)

    def run(fn: Any) -> list[torch.Tensor]:
        for t in (q, k, v):
            t.grad = None
        out = fn()
        out.backward(grad_out.to(out.dtype))
        return [out.detach().float()] + [t.grad.float() for t in (q, k, v)]  # type: ignore[union-attr]

    kernel = run(lambda: block_sparse_attention(q, k, v, *args))
    kv_index = select_kv_blocks(q, k, *args)
    # Both references compute in float32 from the same (possibly 16-bit) inputs.
    reference = run(lambda: block_sparse_attention_reference(q, k, v, *args, kv_index=kv_index))
    dense = run(lambda: F.scaled_dot_product_attention(q.float(), k.float(), v.float()))
    labels = ("out", "dq", "dk", "dv")
    report = {f"{label}_err": (a - b).abs().max().item() for label, a, b in zip(labels, kernel, reference)}
    report |= {f"{label}_vs_sdpa": (a - b).abs().max().item() for label, a, b in zip(labels, kernel, dense)}
    return report


def _selective_checkpoint_case() -> dict[str, float]:
    """The model's selective checkpointing policy keeps the block-sparse op's outputs: the op runs
    once (not again in backward), with the gradients of an un-checkpointed run."""
    import functools

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    from longcat_train.model.bsa import block_sparse_attention
    from longcat_train.model.transformer import _keep_policy

    class CountOps(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountOps.calls += func.name() == "longcat::block_sparse_attention"
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 160, 16, generator=gen).requires_grad_() for _ in range(3))

    def layer(a, b, c):
        return block_sparse_attention(a, b, c, (4, 5, 8), (4, 5, 8), 0.5).sin()

    plain_out = layer(q, k, v)
    plain = torch.autograd.grad(plain_out.sum(), (q, k, v))
    policy = functools.partial(_keep_policy, frozenset({"self_attention"}))
    context = functools.partial(create_selective_checkpoint_contexts, policy)
    with CountOps():
        out = checkpoint(layer, q, k, v, use_reentrant=False, context_fn=context)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
    return {"op_calls": CountOps.calls,
            "grad_err": max((a - b).abs().max().item() for a, b in zip(grads, plain))}


def _regroup_case() -> dict[str, float]:
    """The Triton regroup, pooling and DELTA (token-major inputs, one a slice of a longer buffer as
    the model's output gradient is; padded grid, two batches) against the PyTorch references."""
    from longcat_train.model.bsa import _make_grid, _pool_chunks, _regroup, _to_chunks

    grid = _make_grid((5, 6, 10), (4, 4, 4), "q")
    x = torch.randn(2, grid.n_tokens, 3, 16).transpose(1, 2)
    chunks, pooled, _ = _regroup(x, grid, pool=True)
    reference = _to_chunks(x, grid)
    # the output gradient as the model hands it over: a slice of a longer token-major buffer
    grad = torch.randn(2, grid.n_tokens + 5, 3, 16).transpose(1, 2)[:, :, 5:]
    o = torch.randn(2, grid.n_tokens, 3, 16).transpose(1, 2)
    grad_chunks, _, delta = _regroup(grad, grid, delta_of=o)
    expected_delta = (_to_chunks(grad, grid) * _to_chunks(o, grid)).sum(-1)
    return {"to_chunks_err": max((chunks - reference).abs().max().item(),
                                 (grad_chunks - _to_chunks(grad, grid)).abs().max().item()),
            "pooled_err": (pooled - _pool_chunks(reference, grid)).abs().max().item(),
            "delta_err": (delta - expected_delta).abs().max().item()}


def _top_chunks_case() -> dict[str, Any]:
    """The Triton top-k against torch.topk on random scores (no ties), its tie rule, and its list
    order when some key chunks hold padding."""
    from longcat_train.model import bsa

    gen = torch.Generator().manual_seed(4)
    pooled_q, pooled_k = torch.randn(2, 3, 7, 16, generator=gen), torch.randn(2, 3, 40, 16, generator=gen)
    scores = pooled_q @ pooled_k.transpose(-1, -2)
    expected = torch.topk(scores, 9, dim=-1).indices.sort(-1).values.to(torch.int32)
    # Scores in {0, 1, 2}: keeping 5 of the 8 columns takes every 2, then the lowest-numbered 1s.
    tied_q = torch.tensor([[1.0, 0.0]]).reshape(1, 1, 1, 2)
    tied_k = torch.tensor([[1, 0], [2, 0], [0, 0], [1, 0], [1, 0], [2, 0], [1, 0], [0, 0]], dtype=torch.float32)
    full = torch.full((40,), 64, dtype=torch.int32)
    # Every third key chunk holds padding: the list puts the kept ones after the kept full chunks.
    padded_real = torch.where(torch.arange(40) % 3 == 0, 16, 64).to(torch.int32)
    partitioned, n_full = bsa._top_chunks(pooled_q, pooled_k, 9, padded_real, 64)
    is_padded = padded_real[expected.long()] != 64
    expected_partitioned = (expected + 40 * is_padded).sort(-1).values % 40
    return {"random_equal": torch.equal(bsa._top_chunks(pooled_q, pooled_k, 9, full, 64)[0], expected),
            "tied": bsa._top_chunks(tied_q, tied_k.reshape(1, 1, 8, 2), 5, full[:8], 64)[0].reshape(-1).tolist(),
            "keep_all": bsa._top_chunks(pooled_q, pooled_k, 40, full, 64)[0][0, 0, 0].tolist(),
            "partitioned_equal": torch.equal(partitioned, expected_partitioned.to(torch.int32)),
            "n_full_equal": torch.equal(n_full, (~is_padded).sum(-1, dtype=torch.int32)),
            "some_padded_kept": bool(is_padded.any() and (~is_padded).any())}


@pytest.fixture(scope="module")
def kernel_report() -> dict[str, dict[str, float]]:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(
        [sys.executable, __file__], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"kernel subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", sorted(KERNEL_CASES))
def test_kernel_matches_masked_dense_reference(kernel_report: dict[str, dict[str, float]], case: str) -> None:
    errors, tolerance = kernel_report[case], TOLERANCE[KERNEL_CASES[case][0]]
    for key in ("out_err", "dq_err", "dk_err", "dv_err"):
        assert errors[key] < tolerance, f"{case}: {key}={errors[key]:.3g}"


@pytest.mark.parametrize("case", sorted(KERNEL_CASES))
def test_kernel_is_dense_at_sparsity_zero_and_sparse_otherwise(kernel_report: dict[str, dict[str, float]],
                                                                case: str) -> None:
    errors, tolerance = kernel_report[case], TOLERANCE[KERNEL_CASES[case][0]]
    sparse = KERNEL_CASES[case][6] > 0
    for key in ("out_vs_sdpa", "dq_vs_sdpa", "dk_vs_sdpa", "dv_vs_sdpa"):
        if sparse:  # dropping blocks must actually change the result, or the reference test proves little
            assert errors[key] > 1e-3, f"{case}: {key}={errors[key]:.3g} looks dense"
        else:
            assert errors[key] < tolerance, f"{case}: {key}={errors[key]:.3g}"


def test_selective_checkpointing_keeps_block_sparse_outputs(kernel_report: dict[str, dict[str, float]]) -> None:
    report = kernel_report["selective_checkpoint"]
    assert report["op_calls"] == 1, "the block-sparse op ran again during backward"
    assert report["grad_err"] < 1e-5


# --- pure PyTorch parts (no kernel launch) -------------------------------------------------------


def test_chunk_regroup_follows_3d_chunks_and_pools_real_tokens() -> None:
    from longcat_train.model.bsa import _make_grid, _pool_chunks, _raster_chunk_ids, _to_chunks

    grid = _make_grid((5, 6, 10), (4, 4, 4), "q")
    assert grid.counts == (2, 2, 3) and grid.padded == (8, 8, 12)
    raster = torch.arange(1, grid.n_tokens + 1, dtype=torch.float32).reshape(1, 1, -1, 1)
    chunks = _to_chunks(raster, grid).reshape(grid.n_chunks, grid.chunk_tokens)
    # Each raster token sits in the chunk its (t//4, h//4, w//4) names; the rest is zero padding.
    chunk_of = _raster_chunk_ids(grid, torch.device("cpu"))
    for token in (0, 9, 10, 59, 60, 299):
        assert (chunks[chunk_of[token]] == token + 1).sum() == 1
    assert (chunks != 0).sum() == grid.n_tokens
    # Inside a chunk its real tokens come first, in raster order, then its padding: the kernels pack
    # the real rows of kept edge chunks 16 at a time, so no real row may sit behind padding.
    for chunk in chunks:
        real = chunk[chunk != 0]
        assert torch.equal(chunk[: len(real)], real) and torch.equal(real, real.sort().values)
    assert sorted(set((chunks != 0).sum(1).tolist())) == [4, 8, 16, 32, 64]  # corners, edges, whole chunks
    # Token-major storage (the transformer's) regroups the same; pooling averages real tokens only.
    x = torch.randn(1, grid.n_tokens, 2, 8)
    pooled = _pool_chunks(_to_chunks(x.transpose(1, 2), grid), grid)
    for chunk in range(grid.n_chunks):
        torch.testing.assert_close(pooled[0, :, chunk], x[0, chunk_of == chunk].mean(0))


def test_triton_regroup_and_pooling_equal_the_reference(kernel_report: dict[str, dict[str, float]]) -> None:
    assert kernel_report["regroup"]["to_chunks_err"] == 0.0
    assert kernel_report["regroup"]["pooled_err"] < 1e-6
    assert kernel_report["regroup"]["delta_err"] < 1e-5


def test_triton_top_k_keeps_the_best_chunks_ascending_ties_to_lower_columns(kernel_report: dict[str, Any]) -> None:
    report = kernel_report["top_chunks"]
    assert report["random_equal"]
    assert report["tied"] == [0, 1, 3, 4, 5]
    assert report["keep_all"] == list(range(40))


def test_triton_top_k_lists_padded_chunks_after_full_ones(kernel_report: dict[str, Any]) -> None:
    report = kernel_report["top_chunks"]
    assert report["some_padded_kept"]
    assert report["partitioned_equal"] and report["n_full_equal"]


def test_kept_block_count_follows_official_rule_with_floor_of_one() -> None:
    from longcat_train.model.bsa import kept_kv_block_count

    assert kept_kv_block_count(1440, 0.9375) == 90  # 720p-class: 6 x 12 x 20 key blocks
    assert kept_kv_block_count(17, 0.9375) == 1
    assert kept_kv_block_count(10, 0.95) == 1  # int(0.5) == 0 would select nothing
    assert kept_kv_block_count(12, 0.0) == 12


def _brute_force_selection(q: torch.Tensor, k: torch.Tensor, latent_q: tuple[int, int, int],
                           latent_k: tuple[int, int, int], keep: int, pool_over: str) -> list[set[int]]:
    """Per query block, the set of kept key blocks, computed token by token from raster coords."""

    def pooled(x: torch.Tensor, latent: tuple[int, int, int]) -> torch.Tensor:
        t, h, w = latent
        nt, nh, nw = math.ceil(t / 4), math.ceil(h / 4), math.ceil(w / 4)
        sums = torch.zeros(nt * nh * nw, x.shape[-1], dtype=torch.float64)
        counts = torch.zeros(nt * nh * nw, dtype=torch.float64)
        for i in range(t * h * w):
            ti, hi, wi = i // (h * w), (i // w) % h, i % w
            block = ((ti // 4) * nh + hi // 4) * nw + wi // 4
            sums[block] += x[i].double()
            counts[block] += 1
        return sums / (counts[:, None] if pool_over == "real_tokens" else 64.0)

    scores = pooled(q, latent_q) @ pooled(k, latent_k).T
    return [set(row.topk(keep).indices.tolist()) for row in scores]


def test_selection_pools_real_tokens_and_keeps_top_scores() -> None:
    from longcat_train.model.bsa import select_kv_blocks

    latent_q, latent_k = (3, 6, 10), (5, 6, 10)
    gen = torch.Generator().manual_seed(3)
    # Offsets give the pooled means structure (varied choices per query block), and the per-token
    # offset on k makes block means depend on which tokens count, so padding would skew them.
    q = torch.randn(1, 2, 180, 16, generator=gen) + torch.linspace(-1, 1, 16)
    k = torch.randn(1, 2, 300, 16, generator=gen) + torch.linspace(-1, 1, 300)[:, None]
    kv_index = select_kv_blocks(q, k, latent_q, latent_k, sparsity=0.6)
    assert kv_index.dtype == torch.int32 and kv_index.shape == (1, 2, 6, 4)  # 6 query blocks; int(0.4 * 12) = 4
    assert torch.equal(kv_index, kv_index.sort(-1).values)
    for head in range(2):
        got = [set(row.tolist()) for row in kv_index[0, head]]
        assert got == _brute_force_selection(q[0, head], k[0, head], latent_q, latent_k, 4, "real_tokens")
        # Averaging padding zeros in would pick other blocks here, so the check above has teeth.
        assert got != _brute_force_selection(q[0, head], k[0, head], latent_q, latent_k, 4, "padded_chunk")


def test_reference_at_sparsity_zero_is_plain_attention() -> None:
    from longcat_train.model.bsa import block_sparse_attention_reference

    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 300, 16, generator=gen) for _ in range(3))
    out = block_sparse_attention_reference(q, k, v, (5, 6, 10), (5, 6, 10), sparsity=0.0)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_reference_query_slice_matches_full_rows() -> None:
    from longcat_train.model.bsa import block_sparse_attention_reference

    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 180, 16, generator=gen)
    k, v = (torch.randn(1, 2, 300, 16, generator=gen) for _ in range(2))
    full = block_sparse_attention_reference(q, k, v, (3, 6, 10), (5, 6, 10), sparsity=0.75)
    rows = torch.tensor([0, 7, 61, 179])
    part = block_sparse_attention_reference(q, k, v, (3, 6, 10), (5, 6, 10), sparsity=0.75, query_index=rows)
    torch.testing.assert_close(part, full[:, :, rows])


def test_cpu_without_interpreter_is_refused_with_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    from longcat_train.model.bsa import block_sparse_attention, bsa_unavailable_reason

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "CUDA" in (bsa_unavailable_reason(torch.device("cpu")) or "")
    q = torch.randn(1, 1, 256, 16)
    with pytest.raises(RuntimeError, match="CUDA"):
        block_sparse_attention(q, q, q, (4, 8, 8), (4, 8, 8))


def test_bad_shapes_name_the_argument() -> None:
    from longcat_train.model.bsa import block_sparse_attention

    q = torch.randn(1, 1, 256, 16)
    with pytest.raises(ValueError, match="latent_shape_k"):
        block_sparse_attention(q, q, q, (4, 8, 8), (4, 8, 9))
    with pytest.raises(ValueError, match="chunk_3d_shape_q"):
        block_sparse_attention(q, q, q, (4, 8, 8), (4, 8, 8), chunk_3d_shape_q=(3, 4, 4))
    with pytest.raises(ValueError, match="sparsity"):
        block_sparse_attention(q, q, q, (4, 8, 8), (4, 8, 8), sparsity=1.0)


if __name__ == "__main__":
    # Subprocess entry for the kernel fixture: TRITON_INTERPRET=1 is set by the caller's env.
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    report: dict[str, Any] = {name: _run_kernel_case(name) for name in KERNEL_CASES}
    report["selective_checkpoint"] = _selective_checkpoint_case()
    report["regroup"] = _regroup_case()
    report["top_chunks"] = _top_chunks_case()
    print(json.dumps(report))
