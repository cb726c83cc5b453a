"""`longcat bench`: full-size LongCat-Video with random weights built on the GPU, timed on the same
code path as `train` (strategy, loss, backward, optimizer) or as renders (`denoise`)."""

from __future__ import annotations

import json
import resource
import statistics
import time
from dataclasses import asdict, dataclass, replace

import torch

from .model.activation_offload import HOST_ARENA
from .model.fused_ops import use_fused_kernels
from .model.flops import dense_bf16_peak_flops, transformer_flops
from .model.release import RELEASE_DIT_CONFIG, random_transformer

@dataclass
class BenchSettings:
    mode: str = "train"
    resolution: str = "480x832"
    frames: int = 93
    rank: int = 32
    steps: int = 4
    warmup: int = 2
    attention: str = "auto"
    checkpointing: str = "selective"
    selective_blocks: int | None = None
    offload_block_inputs: bool = True
    keep_cross_attention: bool = False
    # `PROJECTION_ROLES` kept by selective checkpointing; None: the most the planner fits into this
    # GPU and this machine's RAM (as `longcat plan` would recommend)
    keep_projections: tuple[str, ...] | None = None
    autocast: bool = True  # bf16 autocast, as Accelerate's mixed precision runs `train`
    fused_kernels: bool = True
    compile: bool = False
    depth: int = 48
    text_tokens: int = 512
    render_steps: int = 50
    seed: int = 0

    @property
    def pixel_size(self) -> tuple[int, int]:
        """(height, width) of `resolution`."""
        h, w = (int(v) for v in self.resolution.lower().split("x"))
        return h, w

    def memory_settings(self, precision: str = "bf16", swap: int = 0, group_offload: bool = False):
        """The planner's `MemorySettings` for these bench settings (with `precision`, `swap` blocks)."""
        from .memory.planner import MemorySettings

        checkpointing = self.checkpointing != "none"
        return MemorySettings(
            base_model_precision=precision, blocks_to_swap=swap, gradient_checkpointing=checkpointing,
            checkpoint_mode=self.checkpointing if checkpointing else "full", selective_blocks=self.selective_blocks,
            keep_cross_attention=self.keep_cross_attention, keep_projections=tuple(self.keep_projections or ()),
            offload_block_inputs=self.offload_block_inputs, group_offload=group_offload, lora_rank=self.rank,
        )


def _latent_shape(settings: BenchSettings):
    h, w = settings.pixel_size
    return 1 + (settings.frames - 1) // 4, h // 8, w // 8


def _result(settings: BenchSettings, figures: dict) -> dict:
    """The JSON line every mode prints: mode, device, its figures, peak VRAM, settings."""
    return {
        "mode": settings.mode,
        "device": torch.cuda.get_device_name(),
        **figures,
        "peak_vram_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "settings": asdict(settings),
    }


def fitting_projections(settings: BenchSettings) -> tuple[str, ...]:
    """The most projections the planner keeps for `settings` on this GPU and this machine's RAM."""
    from .memory.planner import fastest_projections, machine_memory_gib

    gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    return fastest_projections(settings.memory_settings(), (*settings.pixel_size, settings.frames), gpu_gib,
                               machine_memory_gib())


def bench_train(settings: BenchSettings, device: str = "cuda", before_lora=None, after_lora=None,
                before_step=None) -> dict:
    """`before_lora(model)` / `after_lora(model)`: optional setup steps (quantizing, block swap,
    a memory cap) run around `add_lora`, before the timed steps (`bench_memory.py`).
    `before_step(i)` runs before step i (0-based, warm-up included), e.g. to start a profiler once
    warm-up and autotuning are over (scripts/profile_step.py)."""
    from .lora.adapters import add_lora, compute_lora_in_autocast_dtype
    from .memory.planner import offload_requests
    from .objective.flow import sample_sigmas
    from .objective.loss import flow_matching_loss
    from .objective.strategy import ImageToVideo
    from .training.warmup import WarmupSpec, warm_up_kernels
    from .config.training import DEFAULT_LORA_TARGETS

    if settings.keep_projections is None:
        settings = replace(settings, keep_projections=fitting_projections(settings))
    torch.manual_seed(settings.seed)
    use_fused_kernels(settings.fused_kernels)
    model = random_transformer(device, torch.bfloat16, settings.depth, settings.seed)
    model.set_attention_implementation(settings.attention)
    model.set_activation_checkpointing(settings.checkpointing, settings.selective_blocks,
                                       settings.offload_block_inputs, settings.keep_cross_attention,
                                       settings.keep_projections)
    if before_lora is not None:
        before_lora(model)
    add_lora(model, rank=settings.rank)
    if after_lora is not None:
        after_lora(model)
    if settings.autocast:
        compute_lora_in_autocast_dtype(model)
    model.train()
    if settings.compile:
        for block in model.blocks:
            block.compile()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device == "cuda")
    T, H, W = _latent_shape(settings)
    g = torch.Generator().manual_seed(settings.seed)
    x0 = torch.randn(1, 16, T, H, W, generator=g).to(device)
    text = torch.randn(1, 1, settings.text_tokens, 4096, generator=g).to(device, torch.bfloat16)
    mask = torch.ones(1, settings.text_tokens, dtype=torch.long, device=device)
    mask[:, 200:] = 0
    strategy = ImageToVideo()
    # set up as `train` sets up while loading: the warm-up times then show what is left to the first step
    warmup = warm_up_kernels(WarmupSpec(
        dit_config=dict(RELEASE_DIT_CONFIG), dtype=torch.bfloat16, autocast=settings.autocast,
        attention=settings.attention, checkpointing=settings.checkpointing,
        keep_projections=tuple(settings.keep_projections), lora_rank=settings.rank,
        lora_targets=tuple(DEFAULT_LORA_TARGETS), batch_size=1, conditioning=strategy.name,
    ), [(*settings.pixel_size, settings.frames)], torch.device(device))
    # pinned ahead, as `train` pins it while loading: the warm-up times then show the first step alone
    pin_started = time.perf_counter()
    HOST_ARENA.reserve(offload_requests(settings.memory_settings(), (*settings.pixel_size, settings.frames)))
    pin_seconds = time.perf_counter() - pin_started
    times, warmup_times, losses = [], [], []
    torch.cuda.reset_peak_memory_stats()
    for i in range(settings.warmup + settings.steps):
        torch.cuda.synchronize()
        if before_step is not None:
            before_step(i)
        start = time.perf_counter()
        noise = torch.randn(x0.shape, generator=g).to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=settings.autocast):
            loss, _ = flow_matching_loss(model, x0, noise, sample_sigmas(1, g), text, mask, strategy)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        (times if i >= settings.warmup else warmup_times).append(time.perf_counter() - start)
        losses.append(loss.item())
    s_per_step = statistics.median(times)
    # model FLOPs count the attention actually computed: block-sparse where the dispatcher used it
    grid = (T, H // 2, W // 2)
    sparse, _ = model.attention.bsa_decision(True, grid)
    flops = transformer_flops(RELEASE_DIT_CONFIG | {"depth": settings.depth}, 1, T, H, W, settings.text_tokens,
                              num_cond_latents=1, attention_density=model.attention.bsa.density(grid) if sparse else 1.0)
    peak = dense_bf16_peak_flops()
    tokens = T * (H // 2) * (W // 2)
    swap_arena = getattr(getattr(model, "_block_swap", None), "host_arena", None)
    pinned = HOST_ARENA.reserved_bytes + (swap_arena.reserved_bytes if swap_arena is not None else 0)
    return _result(settings, {
        "s_per_step": round(s_per_step, 3),
        "warmup_s_per_step": [round(t, 3) for t in warmup_times],
        "pin_seconds": round(pin_seconds, 2),
        "kernel_warmup": warmup.as_event(),
        "tokens_per_s": round(tokens / s_per_step, 1),
        "model_tflop_per_step": round(flops.total / 1e12, 1),
        "mfu": None if peak is None else round(flops.total / s_per_step / peak, 3),
        "losses": [round(v, 5) for v in losses],
        "host_pinned_gib": round(pinned / 2**30, 2),  # offloaded activations + swapped weights
        "host_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    })


def bench_vae(settings: BenchSettings, device: str = "cuda") -> dict:
    """VAE encode throughput (clips/s) of the Wan 2.1 VAE architecture (diffusers' default
    `AutoencoderKLWan` config, random weights, bf16) on clips of the benchmark's shape, the work
    `longcat cache` does per clip."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan().to(device, torch.bfloat16).eval()
    h, w = settings.pixel_size
    clip = torch.rand(1, 3, settings.frames, h, w, device=device, dtype=torch.bfloat16) * 2 - 1
    with torch.no_grad():
        vae.encode(clip)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(settings.steps):
            vae.encode(clip)
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / settings.steps
    return _result(settings, {"s_per_clip": round(seconds, 3), "clips_per_s": round(1 / seconds, 3)})


def run_bench(settings: BenchSettings) -> dict:
    if not torch.cuda.is_available():
        raise RuntimeError("longcat bench needs a CUDA GPU (it builds the full 13.6B model on it)")
    result = {"train": bench_train, "vae": bench_vae}[settings.mode](settings)
    print(json.dumps(result), flush=True)
    return result
