"""What the page asks for, on one run: render requests checked and queued, the model freed on
request, and the run's LoRAs, validation renders and loss for the page to list."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from longcat_train.components import load_dit_config
from longcat_train.config import LoadedConfig, parse_resolution
from longcat_train.config.training import Frames, Resolution
from longcat_train.lora import read_lora
from longcat_train.memory import render_fits, render_peak_gib
from longcat_train.training.loss_plot import read_events
from longcat_train.validation.command import DISTILLED_GUIDANCE, DISTILLED_STEPS
from longcat_train.validation.outputs import render_stem, write_render
from longcat_train.validation.previews import PreviewRenderer, distill_lora_path
from longcat_train.validation.render import RenderSettings, load_start_image

from .folders import PathRefused, RunFolders
from .jobs import RenderJob, RenderQueue

MAX_PROMPT_CHARS = 4000


class RenderRequest(BaseModel):
    """One render as the page sends it; sizes follow the `validation_*` keys' rules."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    image: str | None = Field(None, description="an uploaded start frame (relative path): image-to-video")
    lora: str | None = Field(None, description="a LoRA of the run or an uploaded one (relative path)")
    lora_strength: float = Field(1.0, ge=-4.0, le=4.0)
    resolution: Resolution
    frames: Frames
    steps: int = Field(ge=1, le=1000)
    guidance: float = Field(ge=1.0, le=30.0)
    seed: int = Field(ge=0, lt=2**63)
    distilled: bool = False


class RenderRefused(ValueError):
    """A request that cannot render (memory, a file outside the run): the page shows the message."""


class PreviewService:
    def __init__(self, loaded: LoadedConfig, device: str | torch.device | None = None,
                 gpu_memory_gib: float | None = None) -> None:
        self.loaded = loaded
        self.folders = RunFolders.create(Path(loaded.training.output_dir))
        self.renderer = PreviewRenderer(loaded, device)
        if gpu_memory_gib is None and self.renderer.device.type == "cuda":
            gpu_memory_gib = torch.cuda.get_device_properties(self.renderer.device).total_memory / 2**30
        self.gpu_memory_gib = gpu_memory_gib  # None (mps, cpu without --gpu-memory): not checked
        self.dit_config = load_dit_config(loaded.model_dir)
        self.queue = RenderQueue(self._render)

    def defaults(self) -> dict[str, Any]:
        settings = self.renderer.default_settings()
        return {"prompt": self.loaded.training.validation_prompt or "",
                "resolution": f"{settings.height}x{settings.width}", "frames": settings.num_frames,
                "steps": settings.steps, "guidance": settings.guidance, "seed": settings.seed,
                "distilled_steps": DISTILLED_STEPS, "distilled_guidance": DISTILLED_GUIDANCE}

    def status(self) -> dict[str, Any]:
        return {"device": str(self.renderer.device), "model_loaded": self.renderer.model_loaded,
                "gpu_memory_gib": self.gpu_memory_gib, "output_dir": str(self.folders.output_dir),
                "jobs": [job.as_json() for job in self.queue.jobs()]}

    def run_overview(self) -> dict[str, Any]:
        """The LoRAs to pick from, validation renders by step, the loss plot and the last logged step."""
        events_path = self.folders.output_dir / "events.jsonl"
        steps = [e for e in read_events(events_path) if e.get("event") == "step"] if events_path.is_file() else []
        loss_png = self.folders.output_dir / "loss.png"
        return {
            "loras": [{"path": c.path, "label": c.label} for c in self.folders.loras()],
            "validation": self.folders.validation_renders(),
            "loss_png": "loss.png" if loss_png.is_file() else None,
            "loss_png_mtime": loss_png.stat().st_mtime if loss_png.is_file() else None,
            "last_step": {k: steps[-1].get(k) for k in ("step", "loss", "loss_ema", "lr")} if steps else None,
        }

    def submit(self, request: RenderRequest) -> RenderJob:
        """Queue a render after checking its files and (with a GPU memory figure) its predicted peak."""
        height, width = parse_resolution(request.resolution)
        if request.image is not None:
            self._file(request.image, self.folders.uploads)
        if request.lora is not None and request.lora not in {c.path for c in self.folders.loras()}:
            raise RenderRefused(f"LoRA {request.lora!r} is not one of the run's LoRAs or uploads")
        if request.distilled:
            try:
                distill_lora_path(self.loaded.model_dir)
            except ValueError as error:
                raise RenderRefused(str(error)) from error
        if self.gpu_memory_gib is not None:
            precision = self.renderer.precision
            peak = render_peak_gib(precision, height, width, request.frames, request.guidance, self.dit_config)
            if not render_fits(peak, self.gpu_memory_gib):
                raise RenderRefused(
                    f"predicted out of memory: {width}x{height}, {request.frames} frames needs ~{peak:.1f} GiB "
                    f"({precision} weights{', CFG' if request.guidance > 1 else ''}), the GPU has "
                    f"{self.gpu_memory_gib:.1f} GiB. Lower the resolution or frames, use guidance 1 (distilled), "
                    "or a quantized base_model_precision")
        return self.queue.submit(request.model_dump(), request.steps)

    def free(self) -> None:
        """Drop the model from device memory, after the running render (if any) finishes."""
        with self.queue.device_lock:
            self.renderer.free()

    def close(self) -> None:
        self.queue.stop()

    def _file(self, relative: str, under: Path) -> Path:
        try:
            return self.folders.inside(relative, under)
        except PathRefused as error:
            raise RenderRefused(str(error)) from error

    def _render(self, job: RenderJob) -> None:
        request = RenderRequest.model_validate(job.request)
        height, width = parse_resolution(request.resolution)
        settings = RenderSettings(height, width, request.frames, request.steps, request.guidance, request.seed,
                                  distilled=request.distilled, shift=self.renderer.shift,
                                  tiling=self.loaded.training.vae_enable_tiling)
        start = None
        if request.image is not None:
            start = load_start_image(self._file(request.image, self.folders.uploads), height, width)
        loras = []
        if request.lora is not None:
            loras.append((read_lora(self._file(request.lora, self.folders.output_dir)).weights, request.lora_strength))
        job.phase = "loading model" if not self.renderer.model_loaded else "encoding prompt"
        result = self.renderer.render(request.prompt, settings, start, loras, on_step=job.on_step)
        job.phase = "writing"
        files = write_render(self.folders.renders, render_stem(job.id, request.prompt), result.frames)
        job.video, job.sheet = self.folders.relative(files.video), self.folders.relative(files.sheet)
        job.first_frame_psnr = result.first_frame_psnr
        (self.folders.renders / f"{files.video.stem}.json").write_text(json.dumps(job.request, indent=1))
