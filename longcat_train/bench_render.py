"""`longcat bench --mode render`: what a preview render costs at full size, per mode, and what the
fast modes cost in quality.

Random full-size weights (DiT and Wan VAE) on one CUDA GPU. Speed rows at the render shape
(480x832x93 by default): the condition-frame pass, a CFG step (batch 2), a step without CFG
(batch 1: the distilled preview's), the VAE decode, and from them a 50-step CFG render and a
16-step distilled render, in the exact mode (bf16), with FP8 matmuls, and for the official code's
step at the same shape (`--official PATH`: a checkout of meituan-longcat/LongCat-Video).
Two renders are timed whole, with release-shaped LoRA hooks: a distilled preview and the 720p
refinement (block-sparse attention) of a stage-1 video of the render size.
Quality rows render a smaller video end to end (same seed, image-to-video) in each fast mode and
give its PSNR against the exact render; with random weights these show how far a mode's numbers
drift, not how a trained model's video looks.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import statistics
import sys
import time
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .lora import LoraModule, LoraWeights, apply_loras
from .memory.quantize import use_fp8_matmuls
from .model.attention import dense_inference_kernel
from .model.release import RELEASE_DIT_CONFIG, random_transformer
from .release_facts import BLOCK_LINEARS
from .validation.denoise import denoise
from .validation.refine import refine_size, refine_video, refinement_attention, upsample_frames
from .validation.render import RenderResult, decode_latents, psnr, render_video

CFG_GUIDANCE = 4.0
# the official release LoRAs' (cfg_step, refinement) rank and alpha, as its loader reads them
RELEASE_LORA_RANK, RELEASE_LORA_ALPHA = 128, 64.0


@dataclass
class RenderBenchSettings:
    resolution: str = "480x832"
    frames: int = 93
    steps: int = 3  # measured sampler steps per speed row (after one warm-up step)
    render_steps: int = 50
    distilled_steps: int = 16
    official: Path | None = None
    skipped: tuple[str, ...] = ()  # phases left out: quality, fp8, distilled, refine
    quality_resolution: str = "256x448"
    quality_frames: int = 33
    step_cache_thresholds: tuple[float, ...] = (0.05, 0.1, 0.2)
    fewer_steps: tuple[int, ...] = (25,)
    text_tokens: int = 512
    seed: int = 0
    rows: list[dict] = field(default_factory=list)

    @staticmethod
    def size(resolution: str) -> tuple[int, int]:
        h, w = (int(v) for v in resolution.lower().split("x"))
        return h, w


def _synchronized() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


class _Inputs:
    """Render inputs at one size: noise whose frame 0 stands for the start image's latent, a
    prompt and a negative prompt (random umT5-sized features, all 512 tokens valid)."""

    def __init__(self, settings: RenderBenchSettings, height: int, width: int, frames: int) -> None:
        g = torch.Generator().manual_seed(settings.seed)
        self.latents = torch.randn(1, 16, 1 + (frames - 1) // 4, height // 8, width // 8, generator=g).cuda()
        self.text = torch.randn(1, 1, settings.text_tokens, 4096, generator=g).cuda().bfloat16()
        self.negative = torch.randn(1, 1, settings.text_tokens, 4096, generator=g).cuda().bfloat16()
        self.mask = torch.ones(1, settings.text_tokens, dtype=torch.long, device="cuda")


def _step_seconds(model, inputs: _Inputs, steps: int, guidance: float, cache_condition: bool = True) -> float:
    """Median seconds per sampler step of our `denoise` (a warm-up step first)."""
    marks: list[float] = []
    run = lambda n, on_step=None: denoise(  # noqa: E731
        model, inputs.latents, inputs.text, inputs.mask, inputs.negative, inputs.mask, n, guidance,
        num_cond_latents=1, cache_condition=cache_condition, on_step=on_step)
    run(1)
    marks.append(_synchronized())
    run(steps + 1, on_step=lambda *_: marks.append(_synchronized()))
    # the first interval holds the condition pass; the rest are plain steps
    return statistics.median(b - a for a, b in zip(marks[1:], marks[2:]))


def _condition_seconds(model, inputs: _Inputs) -> float:
    model.cache_condition(inputs.latents[:, :, :1])  # warm-up (kernels for the condition's shape)
    start = _synchronized()
    model.cache_condition(inputs.latents[:, :, :1])
    return _synchronized() - start


def _decode_seconds(vae, inputs: _Inputs) -> float:
    decode_latents(vae, inputs.latents[:, :, :2])  # warm-up (cuDNN picks its convolutions)
    start = _synchronized()
    decode_latents(vae, inputs.latents)
    return _synchronized() - start


def _speed_row(settings: RenderBenchSettings, name: str, model, inputs: _Inputs, decode_s: float) -> dict:
    torch.cuda.reset_peak_memory_stats()
    condition_s = _condition_seconds(model, inputs)
    cfg_s = _step_seconds(model, inputs, settings.steps, CFG_GUIDANCE)
    plain_s = _step_seconds(model, inputs, settings.steps, 1.0)
    return {
        "row": name, "s_condition": round(condition_s, 3), "s_per_cfg_step": round(cfg_s, 3),
        "s_per_step_without_cfg": round(plain_s, 3), "s_decode": round(decode_s, 2),
        "s_per_render": round(condition_s + settings.render_steps * cfg_s + decode_s, 1),
        "s_per_distilled_render": round(condition_s + settings.distilled_steps * plain_s + decode_s, 1),
        "peak_vram_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }


def _quality_rows(settings: RenderBenchSettings, name: str, model, vae, modes: list[tuple[str, dict]],
                  reference: dict) -> list[dict]:
    """Render the quality video in each `(mode, render options)`; PSNR against `reference["frames"]`
    (filled by the first mode when empty)."""
    height, width = settings.size(settings.quality_resolution)
    start = _start_image(height, width, settings.seed)
    inputs = _Inputs(settings, height, width, settings.quality_frames)
    rows = []
    for mode, options in modes:
        begin = _synchronized()
        result = render_video(model, vae, inputs.text, inputs.mask, inputs.negative, inputs.mask,
                              height=height, width=width, num_frames=settings.quality_frames,
                              steps=options.get("steps", settings.render_steps), guidance=CFG_GUIDANCE,
                              seed=settings.seed, start_pixels=start, step_cache=options.get("step_cache", 0.0))
        seconds = _synchronized() - begin
        pixels = torch.from_numpy(result.frames).float() / 127.5 - 1
        reference.setdefault("frames", pixels)
        rows.append({"row": f"{name} {mode}", "quality_shape": f"{settings.quality_resolution}x{settings.quality_frames}",
                     "s_render": round(seconds, 2), "skipped_steps": result.skipped_steps,
                     "psnr_db_vs_exact": round(psnr(reference["frames"], pixels), 2)})
    return rows


def _fast_modes(settings: RenderBenchSettings) -> list[tuple[str, dict]]:
    return ([(f"step-cache {t}", {"step_cache": t}) for t in settings.step_cache_thresholds]
            + [(f"{n} steps", {"steps": n}) for n in settings.fewer_steps])


def _release_shaped_lora(model: torch.nn.Module, seed: int) -> LoraWeights:
    """Random weights of the official release LoRAs' shape (rank 128, alpha 64) on every linear of
    every block, made on the model's device: what applying the cfg_step or refinement LoRA costs a
    render (which layers the real files cover is not known here; every block linear is the most)."""
    device = next(model.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    modules = {}
    for index, block in enumerate(model.blocks):
        for path in BLOCK_LINEARS:
            layer = block.get_submodule(path)
            modules[f"blocks.{index}.{path}"] = LoraModule(
                torch.randn(RELEASE_LORA_RANK, layer.in_features, generator=g, device=device) * 0.01,
                torch.randn(layer.out_features, RELEASE_LORA_RANK, generator=g, device=device) * 0.01,
                RELEASE_LORA_ALPHA)
    return LoraWeights(modules)


def _start_image(height: int, width: int, seed: int) -> torch.Tensor:
    return torch.rand(3, 1, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _timed_render(render: Callable[[Callable[[int, int], None]], RenderResult],
                  ) -> tuple[RenderResult, float, list[float]]:
    """(result, seconds, each sampler step's seconds after the first) of `render(on_step)`."""
    marks: list[float] = []
    begin = _synchronized()
    result = render(lambda *_: marks.append(_synchronized()))
    seconds = _synchronized() - begin
    return result, seconds, [b - a for a, b in zip(marks, marks[1:])]


def _distilled_render_row(settings: RenderBenchSettings, model, vae, inputs: _Inputs, lora: LoraWeights) -> dict:
    """A whole distilled preview as `validate --distilled` renders it: the cfg_step LoRA applied as
    forward hooks, start image encoded, 16 steps without CFG, VAE decode."""
    height, width = settings.size(settings.resolution)
    with apply_loras(model, [(lora, 1.0)]):
        _, seconds, steps = _timed_render(lambda on_step: render_video(
            model, vae, inputs.text, inputs.mask, None, None, height=height, width=width,
            num_frames=settings.frames, steps=settings.distilled_steps, guidance=1.0, seed=settings.seed,
            start_pixels=_start_image(height, width, settings.seed), distilled=True, on_step=on_step))
    return {"row": "distilled render, cfg_step-shaped LoRA hooks", "s_render": round(seconds, 1),
            "s_per_step_without_cfg": round(statistics.median(steps), 3),
            "peak_vram_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def _refine_render_row(settings: RenderBenchSettings, model, vae, inputs: _Inputs, lora: LoraWeights) -> dict:
    """The refinement stage on a stage-1 render of the bench's size (random frames), as `validate
    --refine` runs it: 720p-class size, 2x frames, the refinement LoRA's hooks, block-sparse
    self-attention, the truncated schedule without CFG. Timed once, cold: the first call includes
    the block-sparse kernels' Triton autotuning (the per-step figure leaves the first step out)."""
    height, width = settings.size(settings.resolution)
    stage1 = torch.randint(0, 256, (settings.frames, height, width, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(settings.seed)).numpy()
    size = refine_size(height, width)
    condition = upsample_frames(stage1[:1], *size, temporal=False)
    torch.cuda.reset_peak_memory_stats()
    with apply_loras(model, [(lora, 1.0)]), refinement_attention(model):
        result, seconds, steps = _timed_render(lambda on_step: refine_video(
            model, vae, inputs.text, inputs.mask, stage1, seed=settings.seed, size=size,
            condition_pixels=condition, on_step=on_step))
    return {"row": "refine render (BSA, refinement-LoRA-shaped hooks)",
            "refined_shape": "x".join(map(str, (*size, len(result.frames)))), "refine_steps": len(steps) + 1,
            "s_render": round(seconds, 1), "s_per_step_without_cfg": round(statistics.median(steps), 3),
            "peak_vram_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def _sdpa_as_flash_attn() -> types.ModuleType:
    """A `flash_attn` module whose `flash_attn_func` is PyTorch SDPA ([B, S, H, D] layout), for an
    official checkout on a machine without flash-attn: the official code then runs its attention on
    the same SDPA kernels as ours, and every other op as its own."""
    module = types.ModuleType("flash_attn")
    # flash-attn-4 alone makes `flash_attn` a namespace package: keep its `flash_attn.cute` importable
    spec = importlib.util.find_spec("flash_attn")
    if spec is not None and spec.submodule_search_locations is not None:
        module.__path__ = list(spec.submodule_search_locations)

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, **_):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             dropout_p=dropout_p, scale=softmax_scale)
        return out.transpose(1, 2)

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                               dropout_p=0.0, softmax_scale=None, **_):
        # packed [tokens, H, D] sequences: one SDPA call per sequence
        starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        outs = [flash_attn_func(q[None, a:b], k[None, c:d], v[None, c:d], dropout_p, softmax_scale)[0]
                for a, b, c, d in zip(starts_q, starts_q[1:], starts_k, starts_k[1:])]
        return torch.cat(outs)

    module.flash_attn_func = flash_attn_func
    module.flash_attn_varlen_func = flash_attn_varlen_func
    return module


def _official_row(settings: RenderBenchSettings, inputs: _Inputs, decode_s: float) -> dict:
    """The official DiT's CFG step at the render shape, as its image-to-video loop calls it (batch 2,
    frame 0 at timestep 0, `num_cond_latents=1`, no cache), with random bf16 weights."""
    sys.path.insert(0, str(settings.official))
    attention = "flash-attn"
    try:  # flash-attn 2's function, which the official code calls (flash-attn-4 alone lacks it)
        flash2 = hasattr(importlib.import_module("flash_attn"), "flash_attn_func")
    except ImportError:
        flash2 = False
    if not flash2:
        sys.modules["flash_attn"] = _sdpa_as_flash_attn()
        attention = "SDPA in place of flash-attn (not installed)"
    from longcat_video.modules.longcat_video_dit import LongCatVideoTransformer3DModel as OfficialDiT

    # one process: no context-parallel split (the official forward needs the key set)
    config = {**RELEASE_DIT_CONFIG, "enable_flashattn2": True, "enable_flashattn3": False, "enable_bsa": False,
              "cp_split_hw": [1, 1]}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = OfficialDiT(**config).eval()
    finally:
        torch.set_default_dtype(previous)
    latents = torch.cat([inputs.latents, inputs.latents]).bfloat16()
    text = torch.cat([inputs.negative, inputs.text])
    mask = torch.cat([inputs.mask, inputs.mask])
    timestep = torch.full((2, latents.shape[2]), 500.0, device="cuda", dtype=torch.bfloat16)
    timestep[:, 0] = 0
    torch.cuda.reset_peak_memory_stats()
    times = []
    with torch.no_grad():
        for _ in range(settings.steps + 1):
            start = _synchronized()
            model(latents, timestep, text, mask, num_cond_latents=1)
            times.append(_synchronized() - start)
    cfg_s = statistics.median(times[1:])
    return {"row": "official", "attention": attention, "s_per_cfg_step": round(cfg_s, 3),
            "s_per_render": round(settings.render_steps * cfg_s + decode_s, 1),
            "peak_vram_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def _emit(settings: RenderBenchSettings, row: dict) -> None:
    settings.rows.append(row)
    print(json.dumps(row), flush=True)


def run_render_bench(settings: RenderBenchSettings) -> list[dict]:
    """Every row (also printed as a JSON line when it is measured), then a table."""
    if not torch.cuda.is_available():
        raise RuntimeError("longcat bench --mode render needs a CUDA GPU (it builds the full 13.6B model on it)")
    from diffusers import AutoencoderKLWan

    height, width = settings.size(settings.resolution)
    inputs = _Inputs(settings, height, width, settings.frames)
    vae = AutoencoderKLWan().to("cuda", torch.bfloat16).eval()  # the Wan 2.1 VAE's architecture
    decode_s = _decode_seconds(vae, inputs)
    # frozen, as `validate` loads it (`load_dit`)
    model = random_transformer("cuda", torch.bfloat16, seed=settings.seed).eval().requires_grad_(False)
    _emit(settings, {**_speed_row(settings, "exact", model, inputs, decode_s), "attention": dense_inference_kernel()})
    if dense_inference_kernel() != "sdpa":  # the same step on SDPA (cuDNN), what `auto` ran before
        with model.using_attention("sdpa"):
            _emit(settings, {**_speed_row(settings, "exact, SDPA attention", model, inputs, decode_s),
                             "attention": "sdpa"})
    uncached = _step_seconds(model, inputs, settings.steps, CFG_GUIDANCE, cache_condition=False)
    _emit(settings, {"row": "exact, condition recomputed each step", "s_per_cfg_step": round(uncached, 3)})
    reference: dict = {}
    runs = lambda phase: phase not in settings.skipped  # noqa: E731
    if runs("quality"):
        for row in _quality_rows(settings, "exact", model, vae, [("", {}), *_fast_modes(settings)], reference):
            _emit(settings, row)
        if dense_inference_kernel() != "sdpa":  # how far the exact render moves with the kernel
            with model.using_attention("sdpa"):
                for row in _quality_rows(settings, "exact, SDPA attention", model, vae, [("", {})], reference):
                    _emit(settings, row)
    if runs("distilled") or runs("refine"):
        lora = _release_shaped_lora(model, settings.seed)
        if runs("distilled"):
            _emit(settings, _distilled_render_row(settings, model, vae, inputs, lora))
        if runs("refine"):
            _emit(settings, _refine_render_row(settings, model, vae, inputs, lora))
        del lora
    if runs("fp8"):
        use_fp8_matmuls(model)
        _emit(settings, _speed_row(settings, "fp8", model, inputs, decode_s))
        if runs("quality"):
            for row in _quality_rows(settings, "fp8", model, vae, [("", {})], reference):
                _emit(settings, row)
    del model
    torch.cuda.empty_cache()
    if settings.official is not None:
        _emit(settings, _official_row(settings, inputs, decode_s))
    _print_table(settings)
    return settings.rows


def _print_table(settings: RenderBenchSettings) -> None:
    columns = ("row", "attention", "s_per_cfg_step", "s_per_step_without_cfg", "s_per_render", "s_per_distilled_render",
               "refined_shape", "s_render", "skipped_steps", "psnr_db_vs_exact", "peak_vram_gib")
    print(f"render bench, {settings.resolution}x{settings.frames} (quality rows: "
          f"{settings.quality_resolution}x{settings.quality_frames}), {torch.cuda.get_device_name()}")
    print(" | ".join(columns))
    for row in settings.rows:
        print(" | ".join(str(row.get(c, "")) for c in columns))
    print(json.dumps({"settings": {k: (str(v) if isinstance(v, Path) else v)
                                   for k, v in asdict(settings).items() if k != "rows"}}))
