"""A training step's first-call costs, paid while the weights load.

A process's first step costs seconds more than the next (`longcat bench`, 480x832x93 on an H200:
19.5 s against 11.1 s, Triton kernels already compiled): cuDNN builds its attention graphs for
each new shape, CUDA loads kernel modules on first launch, Triton loads its kernels, the
block-sparse kernels look up or run their tuning. None of that depends on the weights. So a
one-block model with random weights, set up like the real one (attention, checkpointing, kept
projections, LoRA and its fused kernels, autocast), runs forward and backward at each bucket's
shape on a thread while the real weights stream in from disk; the first real step finds it all
built.

It runs on a stream of its own: the autotuners time kernels with events on the current stream,
and the loader's copies on the default stream must not land inside those timings.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field

import torch

from ..lora.adapters import add_lora, compute_lora_in_autocast_dtype
from ..model.release import random_transformer
from ..release_facts import TEXT_TOKENS, latent_shape
from ..objective.flow import sample_sigmas
from ..objective.loss import flow_matching_loss
from ..objective.strategy import STRATEGIES

MAX_WARM_BUCKETS = 3  # the largest ones; each adds a second or two


@dataclass(frozen=True)
class WarmupSpec:
    """What the real model runs, as far as kernels care."""

    dit_config: dict
    dtype: torch.dtype  # of the frozen weights
    autocast: bool  # bf16 autocast (Accelerate's mixed precision)
    attention: str
    checkpointing: str  # none | full | selective
    keep_projections: tuple[str, ...]
    lora_rank: int
    lora_targets: tuple[str, ...]
    batch_size: int
    conditioning: str  # the name of the conditioning mode (`STRATEGIES`) training draws

    @classmethod
    def from_config(cls, cfg, dit_config: dict, conditioning: str) -> WarmupSpec:
        return cls(
            dit_config=dict(dit_config),
            dtype=torch.float32 if cfg.base_model_precision == "no_change" else torch.bfloat16,
            autocast=cfg.mixed_precision == "bf16", attention=cfg.attention_implementation,
            checkpointing=cfg.gradient_checkpointing_mode if cfg.gradient_checkpointing else "none",
            keep_projections=tuple(cfg.keep_projections), lora_rank=cfg.lora_rank,
            lora_targets=tuple(cfg.lora_target_modules), batch_size=cfg.train_batch_size,
            conditioning=conditioning,
        )


@dataclass
class WarmupReport:
    buckets: list[tuple[int, int, int]] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None  # a warm-up that failed costs nothing but its time: the step still runs

    def as_event(self) -> dict:
        return {"warmup_buckets": [list(b) for b in self.buckets], "warmup_seconds": round(self.seconds, 2),
                "warmup_error": self.error}


def _forward_backward(spec: WarmupSpec, buckets: list[tuple[int, int, int]], device: torch.device,
                      report: WarmupReport) -> None:
    config = {key: value for key, value in spec.dit_config.items() if key != "depth"}
    model = random_transformer(device, spec.dtype, depth=1, **config)
    model.set_attention_implementation(spec.attention)
    model.set_activation_checkpointing(spec.checkpointing, keep_projections=spec.keep_projections)
    add_lora(model, spec.lora_rank, targets=spec.lora_targets)
    if spec.autocast:
        compute_lora_in_autocast_dtype(model)
    model.train()
    strategy = STRATEGIES[spec.conditioning]
    generator = torch.Generator().manual_seed(0)
    for height, width, frames in sorted(buckets, key=lambda b: b[0] * b[1] * b[2], reverse=True)[:MAX_WARM_BUCKETS]:
        shape = (spec.batch_size, model.config.in_channels, *latent_shape(frames, height, width))
        x0 = torch.randn(shape, device=device)
        text = torch.randn(spec.batch_size, 1, TEXT_TOKENS, model.config.caption_channels, device=device)
        mask = torch.ones(spec.batch_size, TEXT_TOKENS, dtype=torch.long, device=device)
        mask[:, TEXT_TOKENS // 2:] = 0
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.autocast):
            loss, _ = flow_matching_loss(model, x0, torch.randn_like(x0), sample_sigmas(spec.batch_size, generator),
                                         text.to(spec.dtype), mask, strategy)
        loss.backward()
        report.buckets.append((height, width, frames))


def warm_up_kernels(spec: WarmupSpec, buckets: list[tuple[int, int, int]], device: torch.device,
                    report: WarmupReport | None = None) -> WarmupReport:
    """One forward and backward of a one-block model per bucket (height, width, frames), largest
    first, at most `MAX_WARM_BUCKETS`. Memory: one block's weights and working set, no more than
    the planned step holds, all returned to the GPU before this returns."""
    report = report or WarmupReport()
    started = time.perf_counter()
    on_cuda = device.type == "cuda"
    try:
        with contextlib.ExitStack() as scope:
            if on_cuda:
                scope.enter_context(torch.cuda.device(device))
                scope.enter_context(torch.cuda.stream(torch.cuda.Stream(device)))
            _forward_backward(spec, buckets, device, report)
            if on_cuda:
                torch.cuda.current_stream(device).synchronize()
    except Exception as error:  # noqa: BLE001 - reported; the real step then pays the first-call costs
        report.error = f"{type(error).__name__}: {error}"
    if on_cuda:  # its blocks belong to the side stream's pool, which the training step never reuses
        torch.cuda.empty_cache()
    report.seconds = time.perf_counter() - started
    return report


def start_kernel_warmup(spec: WarmupSpec, buckets: list[tuple[int, int, int]],
                        device: torch.device) -> tuple[threading.Thread, WarmupReport]:
    """`warm_up_kernels` on a thread; join it before the first step."""
    report = WarmupReport()
    thread = threading.Thread(target=warm_up_kernels, args=(spec, buckets, device, report),
                              name="kernel-warmup", daemon=True)
    thread.start()
    return thread, report
