"""GPU checks of the full-size transformer: one block in bf16 against the same block in fp32; the
fused Triton block ops against the eager ops (one block, bf16, forward and backward); host offload of
block inputs and kept attention outputs against none (gradients equal to run-to-run noise); the
full 48-block forward at 480x832x93. Prints a JSON line per check."""

import json
import sys
import time

import torch

from longcat_train.model.release import random_transformer
from longcat_train.model.fused_ops import use_fused_kernels


def block_accuracy(tokens_grid=(24, 30, 52)):
    model32 = random_transformer("cuda", torch.float32, depth=1, seed=1)
    model16 = random_transformer("cuda", torch.bfloat16, depth=1, seed=1)
    model16.load_state_dict({k: v.to(torch.bfloat16) for k, v in model32.state_dict().items()})
    T, h, w = tokens_grid
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, T * h * w, 4096, device="cuda", generator=g)
    t_emb = torch.randn(1, T, 512, device="cuda", generator=g)
    text = torch.randn(1, 512, 4096, device="cuda", generator=g)
    out = {}
    with torch.no_grad():
        for name, model, dtype in (("fp32", model32, torch.float32), ("bf16", model16, torch.bfloat16)):
            block = model.blocks[0]
            out[name] = block(x.to(dtype), t_emb, text.to(dtype), None, (T, h, w), 1, model.rope, model.attention).float()
    delta = out["bf16"] - x  # compare the block's update, not the residual it carries
    ref = out["fp32"] - x
    rel = ((delta - ref).norm() / ref.norm()).item()
    return {"check": "block_bf16_vs_fp32", "tokens": T * h * w, "rel_l2_of_update": rel,
            "rel_l2_of_output": ((out["bf16"] - out["fp32"]).norm() / out["fp32"].norm()).item()}


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def fused_vs_eager(tokens_grid=(24, 30, 52)):
    """One block, bf16, I2V: output and input gradient with fused kernels vs eager ops."""
    model = random_transformer("cuda", torch.bfloat16, depth=1, seed=1)
    model.requires_grad_(False)
    T, h, w = tokens_grid
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, T * h * w, 4096, device="cuda", generator=g).to(torch.bfloat16)
    t_emb = torch.randn(1, T, 512, device="cuda", generator=g)
    text = torch.randn(1, 512, 4096, device="cuda", generator=g).to(torch.bfloat16)
    dy = torch.randn(x.shape, device="cuda", generator=g).to(torch.bfloat16)
    results = {}
    for fused in (True, False):
        use_fused_kernels(fused)
        xi = x.clone().requires_grad_(True)
        out = model.blocks[0](xi, t_emb, text, None, (T, h, w), 1, model.rope, model.attention)
        out.backward(dy)
        results[fused] = (out.detach(), xi.grad)
    use_fused_kernels(True)
    (o1, g1), (o0, g0) = results[True], results[False]
    return {"check": "fused_vs_eager_block_bf16", "tokens": T * h * w, "rel_l2_output": _rel(o1, o0),
            "rel_l2_of_update": _rel(o1 - x, o0 - x), "rel_l2_input_grad": _rel(g1, g0),
            "bit_equal_output_fraction": (o1 == o0).float().mean().item()}


def offload_matches(depth=2, tokens_grid=(24, 30, 52)):
    """Training step (selective checkpointing) with and without host offload of block inputs and
    kept attention outputs: the same gradients, lower peak memory."""
    model = random_transformer("cuda", torch.bfloat16, depth=depth, seed=2)
    model.requires_grad_(False)
    trainable = [b.attn.qkv.weight for b in model.blocks]
    for p in trainable:
        p.requires_grad_(True)
    T, H, W = tokens_grid[0], tokens_grid[1] * 2, tokens_grid[2] * 2
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 16, T, H, W, device="cuda", generator=g)
    text = torch.randn(1, 1, 512, 4096, device="cuda", generator=g).to(torch.bfloat16)
    ts = torch.full((1, T), 500.0, device="cuda")
    grads = {}
    for offload in (False, True, "again"):  # "again": without offload, for run-to-run determinism
        model.set_activation_checkpointing("selective", offload_block_inputs=offload is True)
        torch.cuda.reset_peak_memory_stats()
        model(x, ts, text, None, num_cond_latents=1).pow(2).mean().backward()
        grads[offload] = ([p.grad.clone() for p in trainable], torch.cuda.max_memory_allocated() / 2**30)
        for p in trainable:
            p.grad = None
    def diff(a, b):
        return max(_rel(x, y) for x, y in zip(grads[a][0], grads[b][0]))

    return {"check": "offload_block_inputs", "rel_l2_grads_offload_vs_not": diff(True, False),
            "rel_l2_grads_rerun_without_offload": diff("again", False),
            "peak_gib_without": round(grads[False][1], 2), "peak_gib_with": round(grads[True][1], 2)}


def full_forward(resolution=(480, 832), frames=93):
    model = random_transformer("cuda", torch.bfloat16).eval()
    T, H, W = 1 + (frames - 1) // 4, resolution[0] // 8, resolution[1] // 8
    x = torch.randn(1, 16, T, H, W, device="cuda")
    ts = torch.full((1, T), 500.0, device="cuda")
    ts[:, 0] = 0
    text = torch.randn(1, 1, 512, 4096, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(1, 512, dtype=torch.long, device="cuda")
    times = []
    with torch.no_grad():
        for _ in range(3):
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = model(x, ts, text, mask, num_cond_latents=1)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return {"check": "full_forward_480x832x93", "device": torch.cuda.get_device_name(), "s_forward": round(min(times[1:]), 3),
            "finite": bool(torch.isfinite(out).all()), "peak_vram_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


CHECKS = {"block": block_accuracy, "fused": fused_vs_eager, "offload": offload_matches, "forward": full_forward}

if __name__ == "__main__":
    # python scripts/gpu_model_checks.py [check ...]: the named checks (default: all, in this order)
    for name in sys.argv[1:] or CHECKS:
        print(json.dumps(CHECKS[name]()), flush=True)
        torch.cuda.empty_cache()
