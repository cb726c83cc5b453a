"""Profile a LoRA training step of the full-width transformer at reduced depth, or one CFG sampler
step of the full model (`--render`: 480x832x93 image-to-video, the condition frame cached, batch 2);
prints the top CUDA kernels by total time and the time by kernel family (for finding where a step's
time goes).

    python scripts/profile_step.py [depth] [key=value ...]   # BenchSettings fields, e.g. fused_kernels=0
    python scripts/profile_step.py --render [depth]
"""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from longcat_train.bench import BenchSettings, bench_train

# Kernel time by family, so a change's effect can be read as a share of the step.
FAMILIES = [("attention", ("fmha", "flash", "cudnn", "attention")), ("gemm", ("gemm", "xmma", "cutlass", "sm90_", "nvjet")),
            ("triton (fused ops)", ("triton",)), ("copy", ("memcpy", "copy", "cat")),
            ("elementwise", ("elementwise", "vectorized", "unrolled")), ("reduce", ("reduce",))]


def profile_training(depth: int, overrides: dict) -> profile:
    settings = BenchSettings(depth=depth, steps=1, warmup=2, **overrides)
    prof = profile(activities=[ProfilerActivity.CUDA])
    # profile the measured step only: warm-up steps include Triton autotuning runs
    result = bench_train(settings, before_step=lambda i: prof.start() if i == settings.warmup else None)
    prof.stop()
    print(result["s_per_step"], result["peak_vram_gib"])
    return prof


def profile_render(depth: int) -> profile:
    from longcat_train.model.release import random_transformer

    model = random_transformer("cuda", torch.bfloat16, depth).eval().requires_grad_(False)  # as `validate` loads it
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 24, 60, 104, generator=g).cuda().bfloat16()
    text = torch.randn(2, 1, 512, 4096, generator=g).cuda().bfloat16()
    mask = torch.ones(2, 512, dtype=torch.long, device="cuda")
    timestep = torch.full((2, 23), 500.0, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        condition = model.cache_condition(latents[:, :, :1])
        noisy = latents[:, :, 1:].repeat(2, 1, 1, 1, 1)
        model(noisy, timestep, text, mask, condition=condition)  # warm-up
        torch.cuda.synchronize()
        # CPU activity too, with shapes: the op table below names which aten op launched each kernel
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            model(noisy, timestep, text, mask, condition=condition)
            torch.cuda.synchronize()
    return prof


def main(argv: list[str]) -> None:
    render = "--render" in argv
    argv = [a for a in argv if a != "--render"]
    depth = int(argv[0]) if argv else (48 if render else 8)
    overrides = {}
    for item in argv[1:]:
        key, value = item.split("=", 1)
        overrides[key] = int(value) if value.isdigit() else value
    prof = profile_render(depth) if render else profile_training(depth, overrides)
    events = prof.key_averages()
    print(events.table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90))
    if render:  # the aten ops (with their input shapes) whose own kernels take the most time
        ops = prof.key_averages(group_by_input_shape=True)
        print(ops.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=40,
                        max_shapes_column_width=100))
    totals: dict[str, float] = {}
    for event in events:
        if event.device_type.name != "CUDA":
            continue
        name = event.key.lower()
        family = next((f for f, keys in FAMILIES if any(k in name for k in keys)), "other")
        totals[family] = totals.get(family, 0.0) + event.self_device_time_total / 1e3
    step_ms = sum(totals.values())
    for family, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"{family:20s} {ms:9.1f} ms/step  {100 * ms / step_ms:5.1f} %")


if __name__ == "__main__":
    main(sys.argv[1:])
