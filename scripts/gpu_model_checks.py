"""GPU checks of the full-size transformer (issue 3): one block in bf16 against the same block in
fp32, and the full 48-block forward at 480x832x93. Prints a JSON line per check."""

import json
import time

import torch

from longcat_train.bench import random_transformer


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


if __name__ == "__main__":
    print(json.dumps(block_accuracy()), flush=True)
    torch.cuda.empty_cache()
    print(json.dumps(full_forward()), flush=True)
