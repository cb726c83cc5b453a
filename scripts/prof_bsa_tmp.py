import math, sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from longcat_train.model.bsa import block_sparse_attention
grid = (24, 45, 80); n = math.prod(grid); h, d = 32, 128
shape = (1, n, h, d)
q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_() for _ in range(3))
g = torch.randn(shape, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
def step():
    for t in (q, k, v): t.grad = None
    block_sparse_attention(q, k, v, grid, grid, 0.9375).backward(g)
for _ in range(3): step()
torch.cuda.synchronize()
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
    for _ in range(3): step()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
ev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
ev.sort(key=lambda e: e.time_range.start)
# one step's kernel timeline (the last third)
third = ev[len(ev) * 2 // 3:]
t0 = third[0].time_range.start
for e in third:
    print(f"{(e.time_range.start - t0)/1000:9.3f} ms  {e.time_range.elapsed_us()/1000:8.3f} ms  {e.name[:70]}")
