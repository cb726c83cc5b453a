"""Profile LoRA training steps of the full-width transformer at reduced depth; prints the top CUDA
kernels by total time (for finding where a step's time goes).

    python scripts/profile_step.py [depth] [key=value ...]   # BenchSettings fields, e.g. fused_kernels=0
"""

import sys

from torch.profiler import ProfilerActivity, profile

from longcat_train.bench import BenchSettings, bench_train

depth = int(sys.argv[1]) if len(sys.argv) > 1 else 8
overrides = {}
for item in sys.argv[2:]:
    key, value = item.split("=", 1)
    overrides[key] = int(value) if value.isdigit() else value
settings = BenchSettings(depth=depth, steps=1, warmup=2, **overrides)
prof = profile(activities=[ProfilerActivity.CUDA])
# profile the measured step only: warm-up steps include Triton autotuning runs
result = bench_train(settings, before_step=lambda i: prof.start() if i == settings.warmup else None)
prof.stop()
print(result["s_per_step"], result["peak_vram_gib"])
events = prof.key_averages()
print(events.table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90))

# Kernel time by family, so a change's effect can be read as a share of the step.
FAMILIES = [("attention", ("fmha", "flash", "cudnn", "attention")), ("gemm", ("gemm", "xmma", "cutlass", "sm90_")),
            ("triton (fused ops)", ("triton",)), ("copy", ("memcpy", "copy", "cat")),
            ("elementwise", ("elementwise", "vectorized", "unrolled")), ("reduce", ("reduce",))]
totals: dict[str, float] = {}
for event in events:
    if event.device_type.name != "CUDA":
        continue
    name = event.key.lower()
    family = next((f for f, keys in FAMILIES if any(k in name for k in keys)), "other")
    totals[family] = totals.get(family, 0.0) + event.self_device_time_total / 1e3
n_steps = settings.steps
step_ms = sum(totals.values()) / n_steps
for family, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
    print(f"{family:20s} {ms / n_steps:9.1f} ms/step  {100 * ms / n_steps / step_ms:5.1f} %")
