"""`longcat bench --mode bsa`: our Triton block-sparse attention against dense cuDNN SDPA on one GPU.

One attention layer (default 32 heads x 128, bf16), self-attention over a video token grid:
forward and forward+backward times for BSA and for dense SDPA forced to the cuDNN backend, the
speedup, and the bf16 error of BSA against the masked dense reference computed in float32 (on a
slice of heads and query rows for the large grids; gradients on a small grid in full). The cases are
720x1280x93 and 480x832x93 unless `--resolution` / `--frames` name one; `--quick` is a small smoke run.

Prints a table, then one JSON line with everything (the last line of stdout).
"""

from __future__ import annotations

import json
import math
import statistics
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .model import bsa_kernels
from .model.bsa import (
    _make_grid,
    _queries_by_kv_block,
    _regroup,
    _select,
    block_sparse_attention,
    block_sparse_attention_reference,
    kept_kv_block_count,
    select_kv_blocks,
)
from .release_facts import PATCH_SIZE, latent_shape

Shape3D = tuple[int, int, int]

# 86,400 and 37,440 tokens; their token rows (45 and 30) are padded to 48 and 32
RELEASE_RESOLUTIONS = ("720x1280", "480x832")
QUICK_CASES: tuple[tuple[str, Shape3D], ...] = (("quick 8x15x20", (8, 15, 20)),)
GRAD_CHECK_GRID: Shape3D = (8, 15, 16)  # small enough for a full float32 reference with autograd
QUICK_GRAD_CHECK_GRID: Shape3D = (4, 15, 16)
CHUNK: Shape3D = (4, 4, 4)
DEVICE = torch.device("cuda")


def shape_case(resolution: str, frames: int) -> tuple[str, Shape3D]:
    """(label, token grid t x h x w) of a clip shape: its latent shape cut into the DiT's patches."""
    h, w = (int(v) for v in resolution.lower().split("x"))
    latent = latent_shape(frames, h, w)
    return f"{h}x{w}x{frames}", tuple(n // p for n, p in zip(latent, PATCH_SIZE))  # type: ignore[return-value]


@dataclass
class BsaBenchSettings:
    cases: tuple[tuple[str, Shape3D], ...] = tuple(shape_case(r, 93) for r in RELEASE_RESOLUTIONS)
    grad_check_grid: Shape3D = GRAD_CHECK_GRID
    heads: int = 32
    head_dim: int = 128
    sparsity: float = 0.9375
    iters: int = 10  # timed iterations
    warmup: int = 3  # untimed iterations (the first autotunes)
    error_rows: int = 1024  # query rows in the error slice

    @classmethod
    def for_bench(cls, resolution: str | None = None, frames: int | None = None, iters: int | None = None,
                  quick: bool = False) -> BsaBenchSettings:
        """The `longcat bench` options: one clip shape or the release's two (93 frames unless given), or
        the quick smoke run; `iters` defaults to 10 (quick: 3)."""
        if quick:
            return cls(cases=QUICK_CASES, grad_check_grid=QUICK_GRAD_CHECK_GRID, iters=3 if iters is None else iters)
        resolutions = (resolution,) if resolution else RELEASE_RESOLUTIONS
        return cls(cases=tuple(shape_case(r, frames or 93) for r in resolutions), iters=10 if iters is None else iters)


def time_ms(fn: Callable[[], Any], warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def dense_sdpa_backend() -> tuple[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], str]:
    """Dense SDPA pinned to cuDNN; falls back to PyTorch's choice (named in the report) if unavailable."""

    def cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    probe = torch.randn(1, 2, 256, 128, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    try:
        cudnn(probe, probe, probe).sum().backward()
        return cudnn, "cudnn"
    except RuntimeError as err:
        print(f"warning: cuDNN SDPA unavailable ({err}); timing PyTorch's default SDPA backend")
        return F.scaled_dot_product_attention, "default"


def fwd_bwd(attn: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            grad_out: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        for t in (q, k, v):
            t.grad = None
        attn(q, k, v).backward(grad_out)

    return step


def forward_only(attn: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad():
            attn(q, k, v)

    return step


def peak_memory_gib(fn: Callable[[], None]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def output_errors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: Shape3D, sparsity: float,
                  dense: Callable[..., torch.Tensor], rows: int, heads: int) -> dict[str, float]:
    """bf16 BSA (and bf16 dense SDPA, for scale) against float32 references on a slice of rows."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    query_index = torch.randperm(q.shape[2], generator=gen)[:rows].sort().values.to(q.device)
    qs, ks, vs = (t[:, :heads].detach() for t in (q, k, v))
    with torch.no_grad():
        out = block_sparse_attention(qs, ks, vs, grid, grid, sparsity)[:, :, query_index].float()
        kv_index = select_kv_blocks(qs, ks, grid, grid, sparsity)
        ref = block_sparse_attention_reference(qs.float(), ks.float(), vs.float(), grid, grid, sparsity,
                                               kv_index=kv_index, query_index=query_index)
        dense_out = dense(qs, ks, vs)[:, :, query_index].float()
        dense_ref = block_sparse_attention_reference(qs.float(), ks.float(), vs.float(), grid, grid, 0.0,
                                                     query_index=query_index)
    return {
        "bsa_out_max_abs_err": (out - ref).abs().max().item(),
        "bsa_out_mean_abs_err": (out - ref).abs().mean().item(),
        "dense_out_max_abs_err": (dense_out - dense_ref).abs().max().item(),
        "dense_out_mean_abs_err": (dense_out - dense_ref).abs().mean().item(),
        "error_slice_heads": heads,
        "error_slice_query_rows": rows,
    }


def gradient_errors(grid: Shape3D, heads: int, head_dim: int, sparsity: float) -> dict[str, float]:
    """bf16 BSA output and gradients vs. the float32 masked reference, full tensors, small grid."""
    n = math.prod(grid)
    q, k, v = (torch.randn(1, heads, n, head_dim, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))
    grad_out = torch.randn_like(q)
    kv_index = select_kv_blocks(q, k, grid, grid, sparsity)

    def run(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        inputs = [t.detach().requires_grad_() for t in inputs]
        out = fn(*inputs)
        out.backward(grad_out.to(out.dtype))
        return [out.detach().float()] + [t.grad.float() for t in inputs]  # type: ignore[union-attr]

    got = run(lambda a, b, c: block_sparse_attention(a, b, c, grid, grid, sparsity), [q, k, v])
    ref = run(lambda a, b, c: block_sparse_attention_reference(a, b, c, grid, grid, sparsity, kv_index=kv_index),
              [q.float(), k.float(), v.float()])
    report: dict[str, float] = {}
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        report[f"{name}_max_abs_err"] = (a - b).abs().max().item()
        report[f"{name}_rel_err"] = ((a - b).norm() / b.norm()).item()
    return report


def selection_breakdown(q: torch.Tensor, v: torch.Tensor, grid: Shape3D, sparsity: float,
                        warmup: int, iters: int) -> dict[str, float]:
    """Milliseconds per stage: regrouping one tensor into chunk order with and without the pooled
    chunk means, the block selection (gate scores and top-k), and the backward's transposed index."""
    chunks = _make_grid(grid, CHUNK, "q")
    _, pooled, _ = _regroup(q, chunks, pool=True)
    kv_index, _ = _select(pooled, pooled, chunks, sparsity)
    stages = {
        "regroup_pool_one": lambda: _regroup(q, chunks, pool=True),
        "regroup_one": lambda: _regroup(v, chunks),
        "top_chunks": lambda: _select(pooled, pooled, chunks, sparsity),
        "transpose_index": lambda: _queries_by_kv_block(kv_index, chunks.n_chunks),
    }
    with torch.no_grad():
        return {f"select_{name}_ms": time_ms(fn, warmup, iters) for name, fn in stages.items()}


def bench_case(label: str, grid: Shape3D, settings: BsaBenchSettings,
               dense: Callable[..., torch.Tensor]) -> dict[str, Any]:
    n = math.prod(grid)
    # token-major storage seen as [B, heads, N, D], as the transformer hands q, k, v over
    shape = (1, n, settings.heads, settings.head_dim)
    q, k, v = (torch.randn(shape, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
               for _ in range(3))
    grad_out = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2)

    def bsa(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return block_sparse_attention(a, b, c, grid, grid, settings.sparsity, CHUNK, CHUNK)

    n_blocks = math.prod(math.ceil(s / c) for s, c in zip(grid, CHUNK))
    keep = kept_kv_block_count(n_blocks, settings.sparsity)
    result: dict[str, Any] = {"case": label, "tokens": n, "token_grid": list(grid), "blocks": n_blocks,
                              "kept_blocks_per_query_block": keep}
    t = {
        "bsa_fwd_ms": time_ms(forward_only(bsa, q, k, v), settings.warmup, settings.iters),
        "bsa_fwd_bwd_ms": time_ms(fwd_bwd(bsa, q, k, v, grad_out), settings.warmup, settings.iters),
        "dense_fwd_ms": time_ms(forward_only(dense, q, k, v), settings.warmup, settings.iters),
        "dense_fwd_bwd_ms": time_ms(fwd_bwd(dense, q, k, v, grad_out), settings.warmup, settings.iters),
    }
    result |= t
    stages = selection_breakdown(q.detach(), v.detach(), grid, settings.sparsity, settings.warmup, settings.iters)
    # the selection as the op runs it: q and k regrouped and pooled (Triton), scored, top-k (Triton)
    result["selection_ms"] = 2 * stages["select_regroup_pool_one_ms"] + stages["select_top_chunks_ms"]
    result |= stages
    result["speedup_fwd"] = t["dense_fwd_ms"] / t["bsa_fwd_ms"]
    result["speedup_fwd_bwd"] = t["dense_fwd_bwd_ms"] / t["bsa_fwd_bwd_ms"]
    # Attention FLOPs actually done by the sparse kernel (2 matmuls of 2·M·N·D each, padded tokens).
    # Throughput in attention matmuls (2·M·N·D each): forward 2; our backward 7 (dq and dk/dv
    # kernels each recompute P), dense backward 5. Sparse counts padded tokens and kept blocks only.
    block = math.prod(CHUNK)
    sparse_matmul = 2 * settings.heads * (n_blocks * block) * (keep * block) * settings.head_dim
    dense_matmul = 2 * settings.heads * n * n * settings.head_dim
    result["bsa_fwd_tflops"] = 2 * sparse_matmul / t["bsa_fwd_ms"] / 1e9
    result["bsa_fwd_bwd_tflops"] = 9 * sparse_matmul / t["bsa_fwd_bwd_ms"] / 1e9
    result["dense_fwd_tflops"] = 2 * dense_matmul / t["dense_fwd_ms"] / 1e9
    result["dense_fwd_bwd_tflops"] = 7 * dense_matmul / t["dense_fwd_bwd_ms"] / 1e9
    result["bsa_peak_mem_gib"] = peak_memory_gib(fwd_bwd(bsa, q, k, v, grad_out))
    result["dense_peak_mem_gib"] = peak_memory_gib(fwd_bwd(dense, q, k, v, grad_out))
    result |= output_errors(q, k, v, grid, settings.sparsity, dense, rows=settings.error_rows, heads=2)
    return result


def tuned_configs() -> dict[str, Any]:
    """Per kernel: the config the autotuner chose, and each candidate's median ms from its last tuning."""
    kernels = {"forward": bsa_kernels.bsa_forward_kernel, "backward_dq": bsa_kernels.bsa_backward_dq_kernel,
               "backward_dkdv": bsa_kernels.bsa_backward_dkdv_kernel}
    report: dict[str, Any] = {}
    for name, kernel in kernels.items():
        timings = getattr(kernel, "configs_timings", None) or {}
        report[name] = {"best": str(getattr(kernel, "best_config", None)),
                        "candidates_ms": {str(config): round(float(ms[0] if isinstance(ms, (list, tuple)) else ms), 3)
                                          for config, ms in timings.items()}}
    return report


def print_table(cases: list[dict[str, Any]]) -> None:
    columns = [("case", "case", "{}"), ("tokens", "tokens", "{}"), ("keep", "kept_blocks_per_query_block", "{}"),
               ("bsa fwd ms", "bsa_fwd_ms", "{:.2f}"), ("bsa f+b ms", "bsa_fwd_bwd_ms", "{:.2f}"),
               ("select ms", "selection_ms", "{:.2f}"), ("dense fwd ms", "dense_fwd_ms", "{:.2f}"),
               ("dense f+b ms", "dense_fwd_bwd_ms", "{:.2f}"), ("x fwd", "speedup_fwd", "{:.1f}"),
               ("x f+b", "speedup_fwd_bwd", "{:.1f}"), ("bsa TF/s f+b", "bsa_fwd_bwd_tflops", "{:.0f}"),
               ("dense TF/s f+b", "dense_fwd_bwd_tflops", "{:.0f}"), ("bsa err max", "bsa_out_max_abs_err", "{:.2e}"),
               ("dense err max", "dense_out_max_abs_err", "{:.2e}")]
    rows = [[title for title, _, _ in columns]]
    for case in cases:
        if "error" in case:
            rows.append([case["case"], f"FAILED: {case['error']}"] + [""] * (len(columns) - 2))
        else:
            rows.append([fmt.format(case[key]) for _, key, fmt in columns])
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(len(columns))]
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))


def run_bsa_bench(settings: BsaBenchSettings) -> dict[str, Any]:
    """Every case, the gradient check and the tuned kernel configs: printed, and returned as one report."""
    if not torch.cuda.is_available():
        raise RuntimeError("longcat bench --mode bsa needs a CUDA GPU (torch.cuda.is_available() is False)")

    import triton

    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 references must really be float32
    dense, dense_backend = dense_sdpa_backend()
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "heads": settings.heads, "head_dim": settings.head_dim, "dtype": "bfloat16", "sparsity": settings.sparsity,
        "chunk": list(CHUNK), "dense_backend": dense_backend, "iters": settings.iters, "cases": [],
    }
    for label, grid in settings.cases:
        try:
            report["cases"].append(bench_case(label, grid, settings, dense))
        except Exception as err:  # keep going: one failed case must not hide the others' numbers
            traceback.print_exc()
            report["cases"].append({"case": label, "error": f"{type(err).__name__}: {err}"[:300]})
        torch.cuda.empty_cache()
    grad_grid = settings.grad_check_grid
    try:
        report["gradient_check"] = {"token_grid": list(grad_grid), "heads": 4,
                                    **gradient_errors(grad_grid, 4, settings.head_dim, settings.sparsity)}
    except Exception as err:
        traceback.print_exc()
        report["gradient_check"] = {"error": f"{type(err).__name__}: {err}"[:300]}
    report["tuned_configs"] = tuned_configs()

    print(f"\n{report['device']}  torch {report['torch']}  triton {report['triton']}  "
          f"{settings.heads} heads x {settings.head_dim}, bf16, sparsity {settings.sparsity}, "
          f"dense = {dense_backend} SDPA")
    print_table(report["cases"])
    print("gradient check (bf16 vs fp32 masked reference):", report["gradient_check"])
    print("tuned configs:", report["tuned_configs"])
    for case in report["cases"]:
        print(case["case"], {key: round(value, 3) for key, value in case.items() if key.startswith("select_")})
    print(json.dumps(report), flush=True)
    return report
