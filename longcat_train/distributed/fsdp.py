"""The frozen DiT's weights sharded over the processes with PyTorch FSDP2 (`fully_shard`).

Each transformer block is one unit: its weights are all-gathered for its forward (and again for its
backward) and freed after, so each of N processes holds 1/N of the weights plus the blocks in
flight. The LoRA parameters are left out of the shards (`ignored_params`) and stay whole on every
process: a LoRA and its AdamW moments are small beside the base (the planner counts them), and
whole, the optimizer, the checkpoints and the LoRA files read them as in one process. FSDP does not
reduce gradients of parameters it ignores, so `average_gradients` averages them once per optimizer
step, as DDP would.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard


def shard_frozen_weights(transformer: torch.nn.Module, device: torch.device) -> None:
    """Shard every frozen weight of `transformer` (loaded anywhere, e.g. host RAM) over the process
    group onto `device`, one FSDP unit per block and one for the rest (embedders, final layer); the
    trainable parameters move to `device` whole, rank 0's values on every process."""
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.data = parameter.data.to(device)  # FSDP leaves ignored parameters where they are
        dist.broadcast(parameter.data, src=0)  # every process starts from rank 0's LoRA, as DDP does
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    ignored = set(trainable)
    for block in transformer.blocks:  # the root last: FSDP2 needs the units below it first
        fully_shard(block, mesh=mesh, ignored_params=ignored)
    fully_shard(transformer, mesh=mesh, ignored_params=ignored)


def average_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Every process's gradients of `params` replaced by their mean over the processes (all-reduces
    in flight together; gloo has no AVG, so a SUM divided)."""
    grads = [p.grad for p in params if p.grad is not None]
    for work in [dist.all_reduce(g, async_op=True) for g in grads]:
        work.wait()
    for grad in grads:
        grad.div_(dist.get_world_size())
