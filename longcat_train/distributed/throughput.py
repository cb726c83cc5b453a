"""Predicted step time and throughput of N GPUs under a distribution strategy (`longcat plan --gpus`).

A prediction, not a measurement (the multi-GPU runs are measured separately): compute time is the
step's model FLOPs (`model/flops.py`, image-to-video) at `MEASURED_MFU` of the GPU's dense bf16
peak; on top of it the traffic each GPU sends per optimizer step over a link of `link_gb_s`:
  ddp   the LoRA gradients' all-reduce, 2·(N−1)/N × fp32 LoRA bytes (overlaps backward in DDP;
        counted whole, an upper bound)
  fsdp  that, plus two all-gathers of the bf16 base weights (forward, and backward, which gathers
        each block again), (N−1)/N of them each; FSDP gathers a block ahead while the current one
        computes, so the step takes the longer of compute and gathering
  ulysses  the N GPUs compute one sample together (1/N of its FLOPs each), and each block's
        self-attention sends (N−1)/N of q, k, v and the output, bf16, through all-to-alls in
        forward, in the recomputation and in backward (12 tiles a block), not overlapped
"""

from __future__ import annotations

from dataclasses import dataclass

from ..memory.planner import parameter_counts
from ..model.flops import DENSE_BF16_PEAK, transformer_flops
from ..release_facts import RELEASE_DIT_CONFIG, latent_shape, token_count

# train step at 480x832x93, LoRA r32, bf16, selective checkpointing, block inputs offloaded: 11.64 s,
# MFU 0.426 on an H200 (docs/benchmarks.md)
MEASURED_MFU = 0.426
DEFAULT_PEAK_FLOPS = DENSE_BF16_PEAK["H200"]
DEFAULT_LINK_GB_S = 25.0  # a PCIe 4.0 x16 link's usable all-gather bandwidth; NVLink is ~10x more
WEIGHT_GATHERS = 2  # per step with FSDP: forward, and backward
TILE_EXCHANGES = 12  # per block and step with Ulysses: q, k, v, output × forward, recomputation, backward


@dataclass(frozen=True)
class Throughput:
    gpus: int
    strategy: str
    compute_s: float  # per GPU per step (one batch)
    communication_s: float  # per GPU per optimizer step
    step_s: float

    @property
    def samples_per_s(self) -> float:
        return (1 if self.strategy == "ulysses" else self.gpus) / self.step_s

    def as_json(self) -> dict[str, float | int | str]:
        return {"gpus": self.gpus, "strategy": self.strategy, "compute_s": self.compute_s,
                "communication_s": self.communication_s, "step_s": self.step_s, "samples_per_s": self.samples_per_s}


def predict_throughput(bucket: tuple[int, int, int], gpus: int, strategy: str, lora_rank: int, batch_size: int = 1,
                       dit_config: dict | None = None, peak_flops: float | None = None,
                       link_gb_s: float = DEFAULT_LINK_GB_S) -> Throughput:
    """One optimizer step of `gpus` GPUs, each on `batch_size` clips of `bucket` (H, W, F) (all of
    them on the same clips with Ulysses)."""
    config = dict(RELEASE_DIT_CONFIG if dit_config is None else dit_config)
    t, h, w = latent_shape(bucket[2], bucket[0], bucket[1])
    flops = transformer_flops(config, batch_size, t, h, w, num_cond_latents=1).total
    shared_sample = strategy == "ulysses" and gpus > 1
    compute = flops / ((peak_flops or DEFAULT_PEAK_FLOPS) * MEASURED_MFU) / (gpus if shared_sample else 1)
    counts = parameter_counts(config)
    share = (gpus - 1) / gpus
    traffic = 2 * share * counts.lora_per_rank * lora_rank * 4
    if shared_sample:
        tile = batch_size * token_count(bucket[2], bucket[0], bucket[1]) / gpus * counts.hidden * 2
        traffic += TILE_EXCHANGES * counts.depth * share * tile
    gathers = 0.0
    if strategy == "fsdp" and gpus > 1:
        weights = (counts.outside_blocks + counts.depth * (counts.per_block_quantizable + counts.per_block_other)) * 2
        gathers = WEIGHT_GATHERS * share * weights
    link = link_gb_s * 1e9
    step = max(compute, gathers / link) + traffic / link
    return Throughput(gpus, strategy, compute, (traffic + gathers) / link, step)

