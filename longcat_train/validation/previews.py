"""Preview renders with the model kept loaded: the one render path of `longcat validate` and
`longcat serve`. A `PreviewRenderer` encodes prompts (the text encoder is loaded for that and
freed, so it never sits beside the DiT), loads the DiT and the VAE once, and renders any number of
videos with any LoRAs (forward hooks, removed after each render, so the base model stays exact).

Devices: CUDA renders in bf16 with the DiT in the run's `base_model_precision`; Apple MPS in bf16
(the quantized precisions are CUDA kernels); the CPU in float32 with the DiT in the checkpoint's
own dtype. Nothing on the path makes a float64 tensor or
calls CUDA when the device is not CUDA (tests/device_guard.py checks a CPU render).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from longcat_train.cache import TextCache, clean_prompt, collate_text
from longcat_train.components import free_device_memory, load_scheduler, load_text_encoder, load_tokenizer, load_vae
from longcat_train.config import LoadedConfig
from longcat_train.config.model_paths import missing_distill_lora, missing_refinement_lora
from longcat_train.lora import LoraWeights, apply_loras, read_lora
from longcat_train.memory import load_frozen_transformer
from longcat_train.memory.quantize import fp8_matmuls_unavailable, use_fp8_matmuls
from longcat_train.release_facts import CFG_STEP_LORA, REFINEMENT_LORA, TEXT_TOKENS

from .refine import refine_video, refinement_attention
from .render import RenderResult, RenderSettings, render_video

DEVICE_TYPES = ("cuda", "mps", "cpu")
# encoded prompts kept on the host ([1, 1, 512, 4096] each, 8 MiB in float32)
MAX_KEPT_PROMPTS = 64


def render_device(name: str | torch.device | None) -> torch.device:
    """The device a render runs on: `name`, or CUDA when there is one, else the CPU."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"device {name!r}: renders run on {', '.join(DEVICE_TYPES)}")
    present = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}.get(device.type, lambda: True)
    if not present():
        raise ValueError(f"device {name!r}: this machine's torch has no {device.type.upper()} device")
    return device


def distill_lora_path(model_dir: Path) -> Path:
    """The checkpoint's cfg_step LoRA, which distilled previews apply; ValueError when it is missing."""
    return _release_lora(missing_distill_lora(Path(model_dir)), Path(model_dir) / CFG_STEP_LORA)


def refinement_lora_path(model_dir: Path) -> Path:
    """The checkpoint's refinement LoRA, which refined previews apply; ValueError when it is missing."""
    return _release_lora(missing_refinement_lora(Path(model_dir)), Path(model_dir) / REFINEMENT_LORA)


def _release_lora(missing: tuple[str, str, str] | None, path: Path) -> Path:
    if missing is not None:
        where, rule, fix = missing
        raise ValueError(f"{where}: {rule}. Fix: {fix}")
    return path


def render_dtype(device: torch.device) -> torch.dtype:
    """The VAE's and the text encoder's dtype on `device` (bf16 on GPUs; float32 on the CPU, where
    bf16 convolutions are slow)."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


class PreviewRenderer:
    """The run's model on one device, for renders one at a time (not thread-safe: callers keep one
    render in flight)."""

    def __init__(self, loaded: LoadedConfig, device: str | torch.device | None = None, fp8: bool = False) -> None:
        """`fp8`: the DiT's block linears run FP8 matmuls (`use_fp8_matmuls`: faster, approximate)."""
        self.loaded = loaded
        self.device = render_device(device)
        if fp8 and (reason := fp8_matmuls_unavailable(self.device)):
            raise ValueError(f"--fp8: {reason}; render without it")
        self.fp8 = fp8
        self.root = Path(loaded.model_dir)
        self.shift = float(load_scheduler(self.root).config.shift)
        self._transformer: torch.nn.Module | None = None
        self._vae: torch.nn.Module | None = None
        self._text: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._release_loras: dict[Path, LoraWeights] = {}  # the checkpoint's own LoRAs, read once

    @property
    def model_loaded(self) -> bool:
        return self._transformer is not None

    def default_settings(self, distilled: bool = False) -> RenderSettings:
        """The `validation_*` keys' render settings with this checkpoint's scheduler shift."""
        return replace(RenderSettings.from_training(self.loaded.training, shift=self.shift), distilled=distilled)

    def encode(self, prompts: Sequence[str]) -> None:
        """Encode the prompts not yet kept (padded to 512 tokens, cleaned, truncated as the official
        pipeline does), loading the text encoder for them only. Where the encoder does not fit beside
        the loaded DiT, the DiT is freed (the next render loads it again) and the encoding retried."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text]
        if not missing:
            return
        try:
            features = self._encode_features(missing)
        except torch.OutOfMemoryError:
            if not self.model_loaded:
                raise
            self.free()
            features = self._encode_features(missing)
        for prompt, embeds in zip(missing, features, strict=True):
            mask = torch.ones(embeds.shape[0], dtype=torch.long)
            self._text[prompt] = collate_text([(embeds.cpu(), mask)], max_len=TEXT_TOKENS)
        while len(self._text) > MAX_KEPT_PROMPTS:
            self._text.popitem(last=False)

    @property
    def precision(self) -> str:
        """The DiT's `base_model_precision` here: the run's on CUDA (quantized too, as periodic
        validation renders; bf16 under FP8 matmuls, which quantize it themselves), bf16 on MPS, the
        checkpoint's own dtype on the CPU."""
        if self.fp8:
            return "bf16"
        return {"cuda": self.loaded.training.base_model_precision, "mps": "bf16"}.get(self.device.type, "no_change")

    def _encode_features(self, prompts: list[str]) -> list[torch.Tensor]:
        tokenizer = load_tokenizer(self.root)
        encoder = None
        try:
            encoder = load_text_encoder(self.root, dtype=render_dtype(self.device), device=self.device)
            # only `encode` is used, which writes nothing: renders leave no cache entries
            return TextCache(self.root, tokenizer, encoder).encode([clean_prompt(p) for p in prompts])
        finally:
            del encoder
            free_device_memory(self.device)

    def load(self) -> None:
        """Load the DiT and the VAE unless they are loaded."""
        if self._transformer is not None:
            return
        transformer = load_frozen_transformer(self.root / "dit", self.precision, self.device, quantize_device=self.device)
        transformer.set_attention_implementation(self.loaded.training.attention_implementation)
        if self.fp8:
            use_fp8_matmuls(transformer)
        self._vae = load_vae(self.root, dtype=render_dtype(self.device), device=self.device)
        self._transformer = transformer

    def free(self) -> None:
        """Drop the DiT and the VAE and give their device memory back (the next render loads them)."""
        self._transformer = self._vae = None
        free_device_memory(self.device)

    def release_lora(self, path: Path) -> LoraWeights:
        """One of the checkpoint's own LoRAs (`distill_lora_path`, `refinement_lora_path`), read once."""
        if path not in self._release_loras:
            self._release_loras[path] = read_lora(path).weights
        return self._release_loras[path]

    def render(
        self,
        prompt: str,
        settings: RenderSettings,
        start_pixels: torch.Tensor | None = None,
        loras: Sequence[tuple[LoraWeights, float]] = (),
        negative_prompt: str | None = None,
        on_step: Callable[[int, int], None] | None = None,
        condition_frames: torch.Tensor | None = None,
    ) -> RenderResult:
        """One video: image-to-video from `start_pixels` `[3, 1, H, W]` in [-1, 1], a continuation of
        `condition_frames` `[3, N, H, W]`, else text-to-video; the negative prompt defaults to
        `validation_negative_prompt` (empty when unset). Distilled settings add the checkpoint's
        cfg_step LoRA (strength 1, as the official pipeline) before `loras`."""
        if negative_prompt is None:
            negative_prompt = self.loaded.training.validation_negative_prompt or ""
        distill = [(self.release_lora(distill_lora_path(self.root)), 1.0)] if settings.distilled else []
        self.encode([negative_prompt, prompt])
        self.load()
        with apply_loras(self._transformer, [*distill, *loras]):
            return render_video(
                self._transformer, self._vae, *self._text[prompt], *self._text[negative_prompt],
                start_pixels=start_pixels, condition_frames=condition_frames, on_step=on_step,
                **settings.as_kwargs(),
            )

    def refine(
        self,
        prompt: str,
        stage1: RenderResult,
        seed: int,
        condition_pixels: torch.Tensor | None = None,
        spatial_only: bool = False,
        tiling: bool = False,
        on_step: Callable[[int, int], None] | None = None,
    ) -> RenderResult:
        """The official refinement stage on a render (`refine_video`: 720p, 30 fps unless
        `spatial_only`) with the checkpoint's refinement LoRA at strength 1 and no other (as the
        official demos: `enable_loras(["refinement_lora"])`) and block-sparse attention on (the
        official `enable_bsa()`; dense off CUDA, where the kernel does not run), both for this
        render only; the run's attention setting comes back after it. `condition_pixels` `[3, N, H, W]` at the refined size stay clean."""
        lora = self.release_lora(refinement_lora_path(self.root))
        self.encode([prompt])
        self.load()
        transformer = self._transformer
        with apply_loras(transformer, [(lora, 1.0)]), refinement_attention(transformer):
            return refine_video(transformer, self._vae, *self._text[prompt], stage1.frames, seed=seed,
                                condition_pixels=condition_pixels, spatial_only=spatial_only, shift=self.shift,
                                tiling=tiling, on_step=on_step)
