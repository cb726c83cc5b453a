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
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    result = bench_train(settings)
print(result["s_per_step"], result["peak_vram_gib"])
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
