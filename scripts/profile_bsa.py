"""GPU timeline of one block-sparse attention forward + backward: every CUDA kernel of the last
profiled step with its start and duration (what `longcat bench --mode bsa`'s totals are made of).

    python scripts/profile_bsa.py                 # 720x1280x93 grid, 32 heads x 128, bf16
    python scripts/profile_bsa.py --grid 24 30 52 # 480x832x93
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longcat_train.model.bsa import block_sparse_attention  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=int, nargs=3, default=(24, 45, 80), help="latent token grid t h w")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--sparsity", type=float, default=0.9375)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU", file=sys.stderr)
        return 2
    grid = tuple(args.grid)
    shape = (1, math.prod(grid), args.heads, args.head_dim)  # token-major, as the transformer hands it over
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
               for _ in range(3))
    grad_out = torch.randn(shape, device="cuda", dtype=torch.bfloat16).transpose(1, 2)

    def step() -> None:
        for t in (q, k, v):
            t.grad = None
        block_sparse_attention(q, k, v, grid, grid, args.sparsity).backward(grad_out)

    for _ in range(3):  # autotuning and warm-up
        step()
    torch.cuda.synchronize()
    steps = 3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    last = kernels[len(kernels) * (steps - 1) // steps:]
    start = last[0].time_range.start
    print(f"{'start ms':>9}  {'ms':>8}  kernel")
    for event in last:
        print(f"{(event.time_range.start - start) / 1000:9.3f}  {event.time_range.elapsed_us() / 1000:8.3f}  {event.name[:80]}")
    end = max(e.time_range.end for e in last)
    print(f"step: {(end - start) / 1000:.3f} ms from its first kernel's start to its last kernel's end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
