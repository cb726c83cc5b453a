"""Predict peak VRAM and host RAM of a LoRA training step per bucket, and pick settings that fit
both (a GPU leaves `usable_gib` of its memory to the step, a machine `usable_host_gib` of its RAM).

The model (bytes, batch B, N tokens per sample, hidden C, 48 blocks):
  weights      frozen parameters × bytes of their storage, minus the blocks that live on the host
               (block swap keeps two blocks in flight; group offload its groups); sharded over
               `shards` GPUs with FSDP, the blocks' share plus two whole blocks in flight (the
               running one and the one gathered ahead) and the parts outside the blocks whole
  LoRA state   trainable parameters × 16 (fp32 weight, grad, two Adam moments)
  activations  checkpointed block inputs B·N·C·2 per block, kept self-attention outputs B·N·C·2
               per selective block (dense or block-sparse attention alike), as much again for
               kept cross-attention outputs, and the output widths of kept projections × B·N·2
               (with activation offload all of them wait on the host, two blocks' worth in flight
               on the GPU), plus one block's working set
               `WORKING_SET_BYTES_PER_TOKEN`·B·N while it runs forward/backward
  workspace    `WORKSPACE_GIB` (cuBLAS/cuDNN workspaces, allocator slack, loss and embedders)
  host RAM     `HOST_BASE_GIB` + the larger of a bf16 model held whole on the host while loading (only
               where block swap, group offload or FSDP place it from there) and the pinned bytes
               (swapped blocks + offloaded activations, exact sizes: `pinned_memory.PinnedArena`),
               once per process on the machine (`processes_per_machine`)
  Ulysses      every per-token figure over `sequence_shards`: each GPU holds its rows of the tokens

The working-set constant is calibrated on docs/benchmarks.md ("memory settings"): full
checkpointing with block inputs offloaded, 480x832x93 (37,440 tokens), LoRA r32, bf16 weights,
bf16 autocast and fused kernels, measured peak 37.02 GiB on an H200. The other measured rows
(selective, int8-quanto, swap 16, swap 42) are then predicted within 5 %. Without checkpointing
every block keeps its working set (`depth` × the per-block figure); that row is not calibrated.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable

import torch

from ..release_facts import RELEASE_DIT_CONFIG, token_count
from ..config.training import DEFAULT_LORA_TARGETS
from ..model import LongCatVideoTransformer3DModel
from ..model.transformer import PROJECTION_ROLES
from ..pinned_memory import PinnedArena
from .quantize import QUANTIZED_PRECISIONS

GIB = 2**30
# calibration point (H200, docs/benchmarks.md "memory settings"): full checkpointing, block inputs
# offloaded, 37,440 tokens
MEASURED_PEAK_GIB = 37.02
MEASURED_TOKENS = 37_440
WORKSPACE_GIB = 0.75
HOST_BASE_GIB = 6.0  # Python, CUDA context, torch/cuDNN libraries, the data pipeline
# bytes per parameter of quantized linears: payload + scales (per output row, or per 128-group for int4)
STORAGE_BYTES = {"bf16": 2.0, "no_change": 2.0, "int8-quanto": 1.0 + 2 / 4096, "int4-quanto": 0.5 + 4 / 128,
                 "fp8-torchao": 1.0 + 4 / 4096}
IN_FLIGHT_BLOCKS = 2  # block swap: the running block and the prefetched one


def usable_gib(gpu_memory_gib: float) -> float:
    """What a GPU of `gpu_memory_gib` leaves for the predicted peak: the CUDA context and kernel
    images live outside PyTorch's allocator (~0.5 GiB), and allocator fragmentation needs slack
    (a 24 GiB cap ran out with 21.95 GiB allocated and 1.29 GiB reserved but unused; H200,
    docs/benchmarks.md)."""
    return 0.92 * gpu_memory_gib - 1.0


def usable_host_gib(host_memory_gib: float) -> float:
    """What a machine with `host_memory_gib` of RAM leaves for this process's peak (the estimate
    already counts Python, CUDA and the data pipeline): the OS and page cache keep some."""
    return 0.9 * host_memory_gib


@dataclass(frozen=True)
class ParameterCounts:
    per_block_quantizable: int  # the block linears' weights (quantized modes store these compactly)
    per_block_other: int  # adaLN, norms, biases
    outside_blocks: int
    depth: int
    hidden: int
    lora_per_rank: int  # LoRA parameters per unit of rank over all blocks
    projection_widths: tuple[tuple[str, int], ...]  # output features of each `PROJECTION_ROLES` linear


@functools.lru_cache(maxsize=4)
def _counts(config_items: tuple) -> ParameterCounts:
    config = dict(config_items)
    with torch.device("meta"):
        model = LongCatVideoTransformer3DModel(**dict(config, depth=1))
    block = model.blocks[0]
    quantizable = lora = 0
    for name in DEFAULT_LORA_TARGETS:
        linear = block.get_submodule(name)
        quantizable += linear.weight.numel()
        lora += linear.in_features + linear.out_features
    block_total = sum(p.numel() for p in block.parameters())
    outside = sum(p.numel() for p in model.parameters()) - block_total
    widths = tuple((role, getattr(getattr(block, parent), name).out_features)
                   for role, (parent, name) in PROJECTION_ROLES.items())
    return ParameterCounts(quantizable, block_total - quantizable, outside, config["depth"], config["hidden_size"],
                           lora * config["depth"], widths)


def parameter_counts(dit_config: dict | None = None) -> ParameterCounts:
    config = dict(RELEASE_DIT_CONFIG if dit_config is None else dit_config)
    return _counts(tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in config.items()
                                if not isinstance(v, dict))))


@dataclass(frozen=True)
class MemorySettings:
    """The memory-relevant training settings (the config's keys; `keep_cross_attention` is the
    model's `set_activation_checkpointing` flag, off in `train` and `bench`)."""

    base_model_precision: str = "bf16"
    blocks_to_swap: int = 0
    gradient_checkpointing: bool = True
    checkpoint_mode: str = "full"  # "full" | "selective" (with gradient_checkpointing)
    selective_blocks: int | None = None  # None: every block
    keep_cross_attention: bool = False
    keep_projections: tuple[str, ...] = ()  # kept only on the fused bf16 path (see `kept_projections`)
    offload_block_inputs: bool = False
    group_offload: bool = False
    group_offload_type: str = "block_level"
    group_offload_blocks_per_group: int = 1
    group_offload_use_stream: bool = False
    lora_rank: int = 32
    batch_size: int = 1
    shards: int = 1  # GPUs the frozen weights are sharded over (FSDP); 1: whole on every GPU
    sequence_shards: int = 1  # GPUs a sample's tokens are split over (Ulysses)
    processes_per_machine: int = 1  # each holds its own host memory

    @classmethod
    def from_config(cls, cfg, processes: int = 1, processes_per_machine: int | None = None) -> "MemorySettings":
        """From a `TrainingConfig` (or anything with its attribute names) trained by `processes`
        processes, `processes_per_machine` of them (default: all) on each machine."""
        return cls(
            shards=processes if cfg.distributed_strategy == "fsdp" else 1,
            sequence_shards=processes if cfg.distributed_strategy == "ulysses" else 1,
            processes_per_machine=processes if processes_per_machine is None else processes_per_machine,
            base_model_precision=cfg.base_model_precision,
            blocks_to_swap=cfg.musubi_blocks_to_swap,
            gradient_checkpointing=cfg.gradient_checkpointing,
            checkpoint_mode=cfg.gradient_checkpointing_mode,
            selective_blocks=cfg.selective_checkpointing_blocks,
            keep_projections=tuple(cfg.keep_projections),
            offload_block_inputs=cfg.activation_offload,
            group_offload=cfg.enable_group_offload,
            group_offload_type=cfg.group_offload_type,
            group_offload_blocks_per_group=cfg.group_offload_blocks_per_group,
            group_offload_use_stream=cfg.group_offload_use_stream,
            lora_rank=cfg.lora_rank,
            batch_size=cfg.train_batch_size,
        )

    @property
    def kept_projections(self) -> tuple[str, ...]:
        """The projections really kept: selective checkpointing on the fused LoRA path, which
        needs bf16 weights (quantized or fp32 bases recompute them)."""
        selective = self.gradient_checkpointing and self.checkpoint_mode == "selective"
        return self.keep_projections if selective and self.base_model_precision == "bf16" else ()

    def describe(self) -> str:
        parts = [self.base_model_precision]
        if not self.gradient_checkpointing:
            parts.append("no checkpointing")
        elif self.checkpoint_mode == "selective":
            parts.append(f"selective checkpointing ({self.selective_blocks or 'all'} blocks)")
            if self.kept_projections:
                parts.append(f"keeps {'+'.join(self.kept_projections)}")
        else:
            parts.append("full checkpointing")
        if self.offload_block_inputs:
            parts.append("activations offloaded")
        if self.blocks_to_swap:
            parts.append(f"swap {self.blocks_to_swap} blocks")
        if self.group_offload:
            parts.append(f"group offload ({self.group_offload_type})")
        if self.shards > 1:
            parts.append(f"weights sharded over {self.shards} GPUs")
        if self.sequence_shards > 1:
            parts.append(f"tokens split over {self.sequence_shards} GPUs")
        return ", ".join(parts)


def bucket_tokens(height: int, width: int, frames: int) -> int:
    """Transformer tokens of one (H, W, F) bucket: latent frames × (H/16) × (W/16)."""
    return token_count(frames, height, width)


@dataclass(frozen=True)
class Estimate:
    weights: float
    lora_state: float
    activations: float
    workspace: float
    host: float

    @property
    def vram(self) -> float:
        return self.weights + self.lora_state + self.activations + self.workspace


def _block_bytes(counts: ParameterCounts, precision: str) -> float:
    return counts.per_block_quantizable * STORAGE_BYTES[precision] + counts.per_block_other * 2


def _weight_bytes(counts: ParameterCounts, s: MemorySettings) -> tuple[float, float]:
    """(bytes on the GPU, bytes held on the host for swapping/offloading)."""
    block = _block_bytes(counts, s.base_model_precision)
    outside = counts.outside_blocks * 2
    if s.shards > 1:
        return outside + block * (counts.depth / s.shards + IN_FLIGHT_BLOCKS), 0.0
    if s.group_offload:
        # only the running group (and the prefetched one with streams) is on the GPU
        per_group = block * (s.group_offload_blocks_per_group if s.group_offload_type == "block_level" else 1 / 8)
        in_flight = per_group * (2 if s.group_offload_use_stream else 1)
        return outside + in_flight, block * counts.depth
    swapped = min(s.blocks_to_swap, counts.depth)
    in_flight = min(swapped, IN_FLIGHT_BLOCKS)
    return outside + block * (counts.depth - swapped + in_flight), block * swapped


def _per_token_working_set(counts: ParameterCounts) -> float:
    """Calibrated so the measured configuration is reproduced exactly (see the module docstring)."""
    reference = MemorySettings(lora_rank=32, offload_block_inputs=True)
    weights, _ = _weight_bytes(counts, reference)
    checkpointed = IN_FLIGHT_BLOCKS * MEASURED_TOKENS * counts.hidden * 2
    rest = MEASURED_PEAK_GIB * GIB - weights - _lora_bytes(counts, 32) - checkpointed - WORKSPACE_GIB * GIB
    return rest / MEASURED_TOKENS


def _lora_bytes(counts: ParameterCounts, rank: int) -> float:
    return counts.lora_per_rank * rank * 16


# what selective checkpointing can keep, in the order a block's forward produces it
KEPT_FORWARD_ORDER = ("qkv", "self_attention", "attention_out", "cross_q", "cross_attention", "cross_out",
                      "ffn_w1", "ffn_w3")


def _offload_requests(depth: int, hidden_state: int, kept: list[int], selective: int) -> list[int]:
    """Bytes of the host copies one step cuts from the activation-offload arena, in order: each
    block's input, then what its selective checkpointing keeps."""
    return [size for block in range(depth) for size in [hidden_state] + (kept if block < selective else [])]


def _kept_sizes(counts: ParameterCounts, s: MemorySettings, n: int) -> tuple[int, list[int]]:
    """(selective blocks, bytes of each output a selective block keeps, in forward order) for
    `n` tokens in the batch."""
    if not (s.gradient_checkpointing and s.checkpoint_mode == "selective"):
        return 0, []
    selective = counts.depth if s.selective_blocks is None else min(s.selective_blocks, counts.depth)
    sizes = {role: n * width * 2 for role, width in counts.projection_widths}
    sizes["self_attention"] = sizes["cross_attention"] = n * counts.hidden * 2
    kinds = {"self_attention", *s.kept_projections} | ({"cross_attention"} if s.keep_cross_attention else set())
    return selective, [sizes[kind] for kind in KEPT_FORWARD_ORDER if kind in kinds]


def offload_requests(s: MemorySettings, bucket: tuple[int, int, int], dit_config: dict | None = None) -> list[int]:
    """The activation-offload arena's requests of one step on `bucket` (empty without offload):
    what a run reserves ahead (`PinnedArena.reserve`)."""
    if not (s.gradient_checkpointing and s.offload_block_inputs):
        return []
    counts = parameter_counts(dit_config)
    n = s.batch_size * bucket_tokens(*bucket) // s.sequence_shards
    selective, kept = _kept_sizes(counts, s, n)
    return _offload_requests(counts.depth, n * counts.hidden * 2, kept, selective)


def estimate(counts: ParameterCounts, s: MemorySettings, tokens: int) -> Estimate:
    """Peak memory (GiB) of one training step over `tokens` tokens per sample (each GPU holds its
    share of them with Ulysses: attention's all-to-alls trade tokens for heads, same bytes)."""
    n = s.batch_size * tokens // s.sequence_shards
    hidden_state = n * counts.hidden * 2  # one bf16 [B, N, C] tensor
    working_set = _per_token_working_set(counts) * n
    if not s.gradient_checkpointing:
        activations = working_set * counts.depth
        offloaded = 0.0
    else:
        selective, kept = _kept_sizes(counts, s, n)
        if s.offload_block_inputs:
            # every block's tensors get a host copy (cut from the offload arena in this order); two
            # blocks' worth are on the GPU at a time
            offloaded = PinnedArena.reserved_for(_offload_requests(counts.depth, hidden_state, kept, selective))
            activations = IN_FLIGHT_BLOCKS * hidden_state + min(selective, IN_FLIGHT_BLOCKS) * sum(kept)
        else:
            offloaded = 0.0
            activations = counts.depth * hidden_state + selective * sum(kept)
        activations += working_set
    gpu_weights, host_weights = _weight_bytes(counts, s)
    # weights stream tensor by tensor to where they live (`model.loading`); only a bf16 model that
    # block swap or group offload then places from host memory is held there whole first
    full_bf16 = (counts.outside_blocks + counts.depth * (counts.per_block_quantizable + counts.per_block_other)) * 2
    from_host = (s.blocks_to_swap > 0 or s.group_offload or s.shards > 1) and s.base_model_precision not in QUANTIZED_PRECISIONS
    load_peak = full_bf16 if from_host else 0.0
    host = (HOST_BASE_GIB * GIB + max(load_peak, host_weights + offloaded)) * s.processes_per_machine
    return Estimate(gpu_weights / GIB, _lora_bytes(counts, s.lora_rank) / GIB, activations / GIB, WORKSPACE_GIB,
                    host / GIB)


def render_peak_gib(precision: str, height: int, width: int, frames: int, guidance: float,
                    dit_config: dict | None = None) -> float:
    """Predicted peak VRAM (GiB) of one preview render (`validate`, `serve`): the whole DiT in
    `precision` (renders load it whole, no block swap), the batch's hidden states (two samples with
    CFG, guidance > 1) entering and leaving a block, one block's working set and the workspace. The
    working set is the training step's per-token figure (forward and backward), an upper bound of a
    forward's: not calibrated on a render, so it errs towards refusing."""
    counts = parameter_counts(dit_config)
    n = (2 if guidance > 1.0 else 1) * bucket_tokens(height, width, frames)
    weights, _ = _weight_bytes(counts, MemorySettings(base_model_precision=precision))
    activations = 2 * n * counts.hidden * 2 + _per_token_working_set(counts) * n
    return (weights + activations) / GIB + WORKSPACE_GIB


def render_fits(peak_gib: float, gpu_memory_gib: float) -> bool:
    """Whether a render predicted at `peak_gib` fits a GPU of `gpu_memory_gib` (its `usable_gib`)."""
    return peak_gib <= usable_gib(gpu_memory_gib)


class PlanRefusal(RuntimeError):
    """A run predicted to run out of GPU or host memory; the message names the bucket and the advice."""


@dataclass(frozen=True)
class BucketPlan:
    bucket: tuple[int, int, int]
    tokens: int
    estimate: Estimate
    fits_gpu: bool
    fits_host: bool

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_host


@dataclass
class MemoryPlan:
    settings: MemorySettings
    gpu_memory_gib: float
    buckets: list[BucketPlan]
    recommendation: MemorySettings | None
    recommendation_estimate: Estimate | None
    notes: list[str] = field(default_factory=list)
    host_memory_gib: float | None = None  # None: host RAM not checked

    @property
    def fits(self) -> bool:
        return all(b.fits for b in self.buckets)

    @property
    def largest_fitting_bucket(self) -> tuple[int, int, int] | None:
        fitting = [b for b in self.buckets if b.fits]
        return max(fitting, key=lambda b: b.tokens).bucket if fitting else None

    def advice(self) -> str:
        if self.recommendation is None:
            return ("nothing this planner knows fits the largest bucket; lower the resolution or frame count, "
                    "or use a GPU with more memory")
        r = self.recommendation
        keys = [f"base_model_precision={r.base_model_precision!r}", f"musubi_blocks_to_swap={r.blocks_to_swap}",
                f"gradient_checkpointing={str(r.gradient_checkpointing).lower()}"]
        keys.append(f"gradient_checkpointing_mode={r.checkpoint_mode!r}")
        if r.checkpoint_mode == "selective":
            keys.append(f"selective_checkpointing_blocks={json.dumps(r.selective_blocks)}")
            keys.append(f"keep_projections={json.dumps(list(r.kept_projections))}")
        keys.append(f"activation_offload={str(r.offload_block_inputs).lower()}")
        return f"fastest settings predicted to fit: {r.describe()} ({', '.join(keys)})"

    def raise_if_oom(self) -> None:
        """Raise `PlanRefusal` when any bucket is predicted not to fit."""
        over = [b for b in self.buckets if not b.fits]
        if not over:
            return
        gpu_over = [b for b in over if not b.fits_gpu]
        if gpu_over:
            worst = max(gpu_over, key=lambda b: b.estimate.vram)
            need = (f"out of GPU memory: bucket {'x'.join(map(str, worst.bucket))} needs {worst.estimate.vram:.1f} GiB "
                    f"with {self.settings.describe()}, the GPU has {self.gpu_memory_gib:.1f} GiB, "
                    f"{usable_gib(self.gpu_memory_gib):.1f} usable")
        else:
            worst = max(over, key=lambda b: b.estimate.host)
            need = (f"out of host RAM: bucket {'x'.join(map(str, worst.bucket))} needs {worst.estimate.host:.1f} GiB "
                    f"with {self.settings.describe()} (swapped blocks and offloaded activations are pinned there), "
                    f"the machine has {self.host_memory_gib:.1f} GiB, {usable_host_gib(self.host_memory_gib):.1f} usable")
        raise PlanRefusal(
            f"predicted {need} ({len(over)} of {len(self.buckets)} buckets over). {self.advice()}. "
            "Start anyway with the override flag."
        )

    def render(self, console) -> None:
        from rich.table import Column
        from rich.text import Text

        from ..config.problems import ValueTable

        host = "" if self.host_memory_gib is None else f", {self.host_memory_gib:.0f} GiB host RAM"
        table = ValueTable(
            *(Column(name, justify="right") for name in ("bucket (HxWxF)", "tokens", "weights", "LoRA+Adam", "activations",
                                                           "peak VRAM", "host RAM", "fits")),
            title=f"memory plan: {self.settings.describe()} on {self.gpu_memory_gib:.0f} GiB{host}",
        )
        for b in self.buckets:
            e = b.estimate
            table.add_row("x".join(map(str, b.bucket)), f"{b.tokens:,}", f"{e.weights:.1f}", f"{e.lora_state:.1f}",
                          f"{e.activations:.1f}", f"{e.vram:.1f}", f"{e.host:.1f}",
                          Text("yes", style="green") if b.fits else Text("no", style="red"))
        console.print(table)
        largest = self.largest_fitting_bucket
        console.print(f"largest bucket that fits: {'x'.join(map(str, largest)) if largest else 'none'}")
        if self.recommendation_estimate is not None:
            console.print(Text(f"{self.advice()}; predicted peak {self.recommendation_estimate.vram:.1f} GiB"))
        else:
            console.print(Text(self.advice()))
        for note in self.notes:
            console.print(Text(note, style="yellow"))

    def as_json(self) -> dict[str, Any]:
        """The plan for `plan --json`: GiB figures as `render` prints them, unrounded."""
        recommended = self.recommendation
        return {
            "gpu_memory_gib": self.gpu_memory_gib,
            "host_memory_gib": self.host_memory_gib,
            "settings": {**asdict(self.settings), "description": self.settings.describe()},
            "buckets": [
                {"bucket": list(b.bucket), "tokens": b.tokens, **{f"{k}_gib": v for k, v in asdict(b.estimate).items()},
                 "peak_vram_gib": b.estimate.vram, "fits_gpu": b.fits_gpu, "fits_host": b.fits_host, "fits": b.fits}
                for b in self.buckets
            ],
            "largest_fitting_bucket": None if self.largest_fitting_bucket is None else list(self.largest_fitting_bucket),
            "recommendation": None if recommended is None else {
                **asdict(recommended), "description": recommended.describe(),
                "peak_vram_gib": self.recommendation_estimate.vram,
            },
            "advice": self.advice(),
            "notes": self.notes,
        }


# (checkpointing, weights) from fastest to slowest (docs/benchmarks.md, H200, 480x832x93): selective
# checkpointing never recomputes attention; int8 weights cost ~2 %, full checkpointing ~15 %.
SPEED_ORDER = (("selective", "bf16"), ("selective", "int8-quanto"), ("full", "bf16"), ("full", "int8-quanto"),
               ("selective", "int4-quanto"), ("full", "int4-quanto"))
# kept projections, from most to none: each GiB kept per block saves ~5.6 ms of recomputed GEMM per
# block at 480x832x93 (H200, docs/benchmarks.md)
PROJECTION_SETS = (("qkv", "attention_out", "cross_q"), ("qkv", "attention_out"), ("qkv",), ())


def candidate_settings(base: MemorySettings, depth: int, fixed: dict | None = None) -> Iterable[MemorySettings]:
    """Settings from fastest to slowest: for each entry of `SPEED_ORDER`, 0, 1, … depth − 1 swapped
    blocks (swapping 8 to 40 blocks measured 0–5 %), each with the `PROJECTION_SETS` in turn (bf16
    selective only), each first with activation offload (block inputs and kept outputs wait on the
    host: measured free, less GPU memory) and then without it (less host RAM). `fixed`: fields
    (of `MemorySettings`) that keep the given values in every candidate. Sharded weights (FSDP)
    are bf16 and not swapped (`config/checks.py` refuses the others)."""
    plain = replace(base, group_offload=False, gradient_checkpointing=True, selective_blocks=None,
                    keep_cross_attention=False)
    sharded = base.shards > 1
    for mode, precision in SPEED_ORDER:
        if sharded and precision != "bf16":
            continue
        keeps = PROJECTION_SETS if (mode, precision) == ("selective", "bf16") else ((),)
        for swap in range(0, 1 if sharded else depth):
            for projections in keeps:
                for offload in (True, False):
                    varied = dict(checkpoint_mode=mode, base_model_precision=precision, blocks_to_swap=swap,
                                  offload_block_inputs=offload, keep_projections=projections)
                    yield replace(plain, **(varied | (fixed or {})))


def _fits(e: Estimate, gpu_memory_gib: float, host_memory_gib: float | None) -> tuple[bool, bool]:
    """(fits the GPU, fits the machine's RAM; True where the RAM is not known)."""
    host_ok = host_memory_gib is None or e.host <= usable_host_gib(host_memory_gib)
    return e.vram <= usable_gib(gpu_memory_gib), host_ok


def fastest_projections(settings: MemorySettings, bucket: tuple[int, int, int], gpu_memory_gib: float,
                        host_memory_gib: float | None) -> tuple[str, ...]:
    """The largest of `PROJECTION_SETS` that `settings` can keep on `bucket` within the GPU's and
    the machine's memory (() where none fits)."""
    counts, tokens = parameter_counts(), bucket_tokens(*bucket)
    for projections in PROJECTION_SETS:
        if all(_fits(estimate(counts, replace(settings, keep_projections=projections), tokens), gpu_memory_gib,
                     host_memory_gib)):
            return projections
    return ()


# The config keys `train` sets from the plan when a config leaves them unset, and the
# `MemorySettings` field each one is. The weights' precision is not among them: it changes what
# is trained, not only how fast, so it stays the user's choice (the plan's advice may name it).
PLANNED_KEYS = {
    "gradient_checkpointing": "gradient_checkpointing",
    "gradient_checkpointing_mode": "checkpoint_mode",
    "selective_checkpointing_blocks": "selective_blocks",
    "keep_projections": "keep_projections",
    "activation_offload": "offload_block_inputs",
    "musubi_blocks_to_swap": "blocks_to_swap",
}
# with group offload chosen, the user has taken memory placement into their own hands
_HANDS_ON_KEYS = ("enable_group_offload", "group_offload_type", "group_offload_blocks_per_group",
                  "group_offload_use_stream")


def planned_config_keys(config, buckets: list[tuple[int, int, int]], gpu_memory_gib: float,
                        host_memory_gib: float | None, dit_config: dict | None = None, processes: int = 1,
                        processes_per_machine: int | None = None) -> dict:
    """The fastest values of the `PLANNED_KEYS` a `TrainingConfig` leaves unset (its
    `model_fields_set` tells) that fit the largest bucket on this GPU and this machine's RAM with
    everything the user set kept as set: {config key: value} for the keys whose value changes;
    {} when the user set them all, chose group offload, or nothing fits (the plan then refuses).
    `processes` train together, `processes_per_machine` (default: all) share one machine's RAM."""
    explicit = set(config.model_fields_set)
    if any(key in explicit for key in _HANDS_ON_KEYS) or config.enable_group_offload:
        return {}
    base = MemorySettings.from_config(config, processes, processes_per_machine)
    fixed = {field: getattr(base, field) for key, field in PLANNED_KEYS.items() if key in explicit}
    fixed["base_model_precision"] = base.base_model_precision
    counts = parameter_counts(dit_config)
    largest = max(bucket_tokens(*bucket) for bucket in buckets)
    for candidate in candidate_settings(base, counts.depth, fixed):
        if all(_fits(estimate(counts, candidate, largest), gpu_memory_gib, host_memory_gib)):
            values = {key: getattr(candidate, field) for key, field in PLANNED_KEYS.items() if key not in explicit}
            values = {key: list(v) if isinstance(v, tuple) else v for key, v in values.items()}
            return {key: value for key, value in values.items() if value != getattr(config, key)}
    return {}


def machine_memory_gib() -> float | None:
    """This machine's physical RAM (None where the OS does not say, e.g. Windows: then the plan
    does not check host RAM)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (AttributeError, ValueError, OSError):
        return None


def plan_memory(config, buckets: list[tuple[int, int, int]], gpu_memory_gib: float,
                dit_config: dict | None = None, host_memory_gib: float | None = None, processes: int = 1,
                processes_per_machine: int | None = None) -> MemoryPlan:
    """Predict every bucket (H, W, F) under `config` (a TrainingConfig or MemorySettings) on a GPU
    with `gpu_memory_gib` (and, when given, a machine with `host_memory_gib` of RAM), and recommend
    the fastest settings that fit the largest bucket. A TrainingConfig is trained by `processes`,
    `processes_per_machine` of them (default: all) on each machine (FSDP shards over all of them)."""
    if not buckets:
        raise ValueError("plan_memory needs at least one (height, width, frames) bucket")
    settings = (config if isinstance(config, MemorySettings)
                else MemorySettings.from_config(config, processes, processes_per_machine))
    counts = parameter_counts(dit_config)

    rows = []
    for bucket in buckets:
        tokens = bucket_tokens(*bucket)
        e = estimate(counts, settings, tokens)
        rows.append(BucketPlan(tuple(bucket), tokens, e, *_fits(e, gpu_memory_gib, host_memory_gib)))
    largest = max(r.tokens for r in rows)
    recommendation = recommendation_estimate = None
    for candidate in candidate_settings(settings, counts.depth):
        e = estimate(counts, candidate, largest)
        if all(_fits(e, gpu_memory_gib, host_memory_gib)):
            recommendation, recommendation_estimate = candidate, e
            break
    notes = []
    if settings.blocks_to_swap and not settings.gradient_checkpointing:
        notes.append("block swap saves no memory without gradient_checkpointing (autograd keeps every block's weights)")
    if not math.isfinite(gpu_memory_gib) or gpu_memory_gib <= 0:
        raise ValueError(f"gpu_memory_gib={gpu_memory_gib}: give the GPU's memory in GiB")
    return MemoryPlan(settings, gpu_memory_gib, rows, recommendation, recommendation_estimate, notes, host_memory_gib)
