"""Validation during training: preview renders, first-frame fidelity and a held-out loss.

The training loop builds one `Validator` before the first step and calls `run` every
`validation_step_interval` steps. A run leaves the training state as it found it: torch's CPU and
CUDA RNG states (forked), every module's train/eval flag (saved and restored one by one), no
autograd graph (no_grad), and no VAE left in memory (loaded per run, freed after).

Several processes: `run` renders on the calling process only and has no collective operations,
so call it on the main process and let the others wait at the caller's barrier::

    if accelerator.is_main_process:
        metrics = validator.run(accelerator.unwrap_model(transformer), step, writer)
    accelerator.wait_for_everyone()

This needs the whole model on the main process (DDP replicas). With weights sharded over the
processes (FSDP), every forward gathers them from all processes, so every process calls `run` with
the same inputs; only the one built with `writes_renders` writes the video files.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from diffusers import AutoencoderKLWan

from longcat_train.cache import CachedLatent, clean_prompt, collate_text
from longcat_train.components import free_device_memory, load_scheduler
from longcat_train.config import LoadedConfig, TrainingConfig
from longcat_train.config.orientation import follow_orientation
from longcat_train.config.prompt_file import PromptEntry
from longcat_train.data import ClipItem, load_start_frame_pixels
from longcat_train.objective.flow import shift_sigmas
from longcat_train.objective.loss import flow_matching_loss
from longcat_train.objective.strategy import fixed_strategy
from longcat_train.release_facts import TEXT_TOKENS

from .continuation import continuation_size, load_condition_frames
from .outputs import contact_sheet, render_stem, write_render
from .render import RenderSettings, fit_pixels, load_start_image, render_video

# The padded text length of the release (`text_tokens_zero_pad`: padding is attended as zeros).
HELDOUT_QUANTILES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# Renders are the slow part of a validation; an eval split of hundreds of clips renders its first few.
MAX_DATASET_RENDERS = 4

logger = logging.getLogger(__name__)


class ScalarImageWriter(Protocol):
    """The part of TensorBoard's SummaryWriter that validation uses."""

    def add_scalar(self, tag: str, value: float, global_step: int) -> Any: ...

    def add_image(self, tag: str, img: np.ndarray, global_step: int, dataformats: str) -> Any: ...


@dataclass(frozen=True)
class ValidationCase:
    """One render: its file stem, prompt, start frame (`[3, 1, H, W]`, None for text-to-video),
    size (height, width), and for a video continuation its condition frames (`[3, N, H, W]`)."""

    stem: str
    prompt: str
    start_pixels: torch.Tensor | None
    size: tuple[int, int]
    condition_frames: torch.Tensor | None = None

    def render_inputs(self) -> dict[str, torch.Tensor | None]:
        """The keyword arguments of `render_video` that condition this render."""
        return {"start_pixels": self.start_pixels, "condition_frames": self.condition_frames}


def continuation_case(index: int, prompt: str, video: Path, cond_frames: int, size: tuple[int, int]) -> ValidationCase:
    """A render continuing `video` from its last `cond_frames` frames, at `size` turned to its
    orientation; raises ValueError naming the clip when it cannot be used."""
    height, width = continuation_size(video, size)
    frames = load_condition_frames(video, cond_frames, height, width)
    return ValidationCase(render_stem(index, prompt), prompt, None, (height, width), frames)


@dataclass(frozen=True)
class HeldOutLatents:
    """Cached latents of one eval item: the clip, and its start frame when it is image-to-video."""

    clip: CachedLatent
    start: CachedLatent | None = None


def validation_cases(
    training: TrainingConfig, eval_items: Sequence[ClipItem], prompt_entries: Sequence[PromptEntry] = (),
    max_dataset_renders: int = MAX_DATASET_RENDERS,
) -> list[ValidationCase]:
    """With `validation_using_datasets`, the start frames and captions of the first eval clips (one
    window per file), each rendered at `validation_resolution` turned to its clip's orientation;
    else `validation_prompt` as text-to-video, or with `validation_continuation_video` as that
    clip's continuation (also beside the dataset renders); then each prompt of
    `validation_prompt_file` (with its start image: image-to-video). A start image or clip that
    cannot be read is skipped and logged."""
    size, video = training.validation_size, training.validation_continuation_video
    cases: list[ValidationCase] = []
    if training.validation_using_datasets:
        seen: set[Path] = set()
        for item in eval_items:
            if len(cases) >= max_dataset_renders:
                break
            if item.path in seen:
                continue
            seen.add(item.path)
            item_size = follow_orientation(size, (item.bucket.height, item.bucket.width))
            start = _start_pixels(lambda: fit_pixels(load_start_frame_pixels(item), *item_size), item.path) if item.is_i2v else None
            if item.is_i2v and start is None:
                continue
            cases.append(ValidationCase(render_stem(len(cases), item.caption), item.caption, start, item_size))
    elif training.validation_prompt is not None and video is None:
        cases.append(ValidationCase(render_stem(0, training.validation_prompt), training.validation_prompt, None, size))
    if video is not None and training.validation_prompt is not None:
        try:
            cases.append(continuation_case(len(cases), training.validation_prompt, video,
                                           training.validation_continuation_cond_frames, size))
        except ValueError as error:  # checked at config load; a clip changed since is skipped, never a crash
            logger.warning("validation skips the continuation of %s: %s", video, error)
    for entry in prompt_entries:
        image = entry.image
        start = None if image is None else _start_pixels(lambda image=image: load_start_image(image, *size), image)
        if image is None or start is not None:
            cases.append(ValidationCase(render_stem(len(cases), entry.prompt), entry.prompt, start, size))
    return cases


def _start_pixels(load: Callable[[], torch.Tensor], source: Path) -> torch.Tensor | None:
    try:
        return load()
    except Exception as error:  # noqa: BLE001 - one bad start image is skipped and reported, never a crash
        logger.warning("validation skips %s: cannot read its start frame (%s)", source, error)
        return None


def sigma_quantiles(scheme: str, shift: float, quantiles: Sequence[float] = HELDOUT_QUANTILES) -> torch.Tensor:
    """The σ at fixed quantiles of the training σ distribution (unit logit-normal or uniform, then
    shifted), so the held-out loss is comparable across validations and runs."""
    q = torch.tensor(quantiles, dtype=torch.float64)
    u = q if scheme == "uniform" else torch.sigmoid(torch.special.ndtri(q))
    return shift_sigmas(u, shift).float()


class Validator:
    """Renders and held-out loss of one training run; see the module notes for the contract.

    `text_features` maps prompts (raw or cleaned) to unpadded `(embeds [L, C], mask [L])` as the
    text cache returns them; it must hold every prompt of `required_prompts`. `vae_loader()` returns
    the VAE on the render device; it is called once per run and the VAE freed after.
    `eval_latents`, aligned with `eval_items`, enables the held-out loss.
    """

    def __init__(
        self,
        loaded: LoadedConfig,
        text_features: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        vae_loader: Callable[[], AutoencoderKLWan],
        eval_items: Sequence[ClipItem] = (),
        eval_latents: Sequence[HeldOutLatents] | None = None,
        max_dataset_renders: int = MAX_DATASET_RENDERS,
        writes_renders: bool = True,
    ) -> None:
        training = loaded.training
        self.writes_renders = writes_renders
        if eval_latents is not None and len(eval_latents) != len(eval_items):
            raise ValueError(f"eval_latents has {len(eval_latents)} entries for {len(eval_items)} eval_items")
        self.output_root = Path(training.output_dir) / "validation"
        self.vae_loader = vae_loader
        scheduler_shift = float(load_scheduler(loaded.model_dir).config.shift)
        self.settings = RenderSettings.from_training(training, shift=scheduler_shift)
        self.cases = validation_cases(training, eval_items, loaded.prompt_entries, max_dataset_renders)
        self.heldout_items = list(eval_items) if eval_latents is not None else []
        self.heldout_latents = list(eval_latents or [])
        self.heldout_sigmas = sigma_quantiles(
            training.flow_sigma_sampling, training.flow_schedule_shift or scheduler_shift
        )
        self.heldout_seed = self.settings.seed
        features = {clean_prompt(prompt): value for prompt, value in text_features.items()}
        needed = [
            training.validation_negative_prompt or "",
            *(case.prompt for case in self.cases),
            *(item.caption for item in self.heldout_items),
        ]
        missing = sorted({clean_prompt(p) for p in needed} - features.keys())
        if missing:
            raise KeyError(
                f"text features missing for {len(missing)} validation prompt(s), e.g. {missing[:3]}. "
                "Fix: encode Validator.required_prompts(...) with the TextCache and pass them all."
            )
        self._text = {p: collate_text([features[clean_prompt(p)]], max_len=TEXT_TOKENS) for p in needed}
        self.negative = self._text[needed[0]]

    @staticmethod
    def required_prompts(loaded: LoadedConfig, eval_items: Sequence[ClipItem] = ()) -> list[str]:
        """Every prompt whose text features the validator needs (empty/negative prompt included)."""
        training = loaded.training
        prompts = [training.validation_negative_prompt or "", training.validation_prompt or "",
                   *(entry.prompt for entry in loaded.prompt_entries)]
        return list(dict.fromkeys([*prompts, *(item.caption for item in eval_items)]))

    def run(self, transformer: torch.nn.Module, step: int, writer: ScalarImageWriter | None = None) -> dict[str, float]:
        """Render every case into `output_dir/validation/step_<step>/`, compute first-frame PSNR and
        the held-out loss, log them to `writer`, and return the metrics."""
        modes = [(module, module.training) for module in transformer.modules()]
        cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        metrics: dict[str, float] = {}
        with torch.random.fork_rng(devices=cuda_devices), torch.no_grad():
            transformer.eval()
            try:
                if self.cases:
                    metrics.update(self._render(transformer, step, writer))
                if self.heldout_items:
                    metrics.update(self._heldout_loss(transformer))
            finally:
                for module, mode in modes:
                    module.training = mode
        if writer is not None:
            for tag, value in metrics.items():
                writer.add_scalar(tag, value, step)
        return metrics

    def _render(self, transformer: torch.nn.Module, step: int, writer: ScalarImageWriter | None) -> dict[str, float]:
        directory = self.output_root / f"step_{step}"
        fidelity: list[float] = []
        vae = self.vae_loader()
        try:
            for case in self.cases:
                embeds, mask = self._text[case.prompt]
                result = render_video(
                    transformer, vae, embeds, mask, *self.negative,
                    **case.render_inputs(), **self.settings.sized(*case.size).as_kwargs(),
                )
                if self.writes_renders:
                    write_render(directory, case.stem, result.frames)
                if result.first_frame_psnr is not None:
                    fidelity.append(result.first_frame_psnr)
                if writer is not None:
                    sheet = np.asarray(contact_sheet(result.frames))
                    writer.add_image(f"validation/{case.stem}", sheet, step, dataformats="HWC")
        finally:
            del vae
            free_device_memory()
        return {"validation/first_frame_psnr": float(np.mean(fidelity))} if fidelity else {}

    def _heldout_loss(self, transformer: torch.nn.Module) -> dict[str, float]:
        """Flow-matching loss of each eval item at each σ quantile, with the posterior mean as x0
        and noise from a fixed seed: the same inputs every validation."""
        device = next(transformer.parameters()).device
        generator = torch.Generator("cpu").manual_seed(self.heldout_seed)
        totals = torch.zeros(len(self.heldout_sigmas), dtype=torch.float64)
        for item, latents in zip(self.heldout_items, self.heldout_latents, strict=True):
            x0 = latents.clip.mean[None].float()
            strategy = fixed_strategy(item, x0.shape[2])
            start = None if latents.start is None else latents.start.mean[None].to(device)
            embeds, mask = (t.to(device) for t in self._text[item.caption])
            for index, sigma in enumerate(self.heldout_sigmas):
                noise = torch.randn(x0.shape, generator=generator)
                loss, _ = flow_matching_loss(
                    transformer, x0.to(device), noise.to(device), sigma.view(1), embeds, mask, strategy, start
                )
                totals[index] += loss.item()
        per_sigma = totals / len(self.heldout_items)
        metrics = {
            f"validation/heldout_loss_q{round(q * 100):02d}": float(v)
            for q, v in zip(HELDOUT_QUANTILES, per_sigma, strict=True)
        }
        metrics["validation/heldout_loss"] = float(per_sigma.mean())
        return metrics
