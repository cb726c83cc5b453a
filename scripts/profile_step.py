"""Profile LoRA training steps of the full-width transformer at reduced depth; prints the top CUDA
kernels by total time (for finding where a step's time goes)."""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from longcat_train.bench import BenchSettings, bench_train

depth = int(sys.argv[1]) if len(sys.argv) > 1 else 8
compile_blocks = len(sys.argv) > 2 and sys.argv[2] == "compile"
settings = BenchSettings(depth=depth, steps=1, warmup=2, checkpointing="full", compile=compile_blocks)
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    result = bench_train(settings)
print(result["s_per_step"], result["peak_vram_gib"])
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90))
