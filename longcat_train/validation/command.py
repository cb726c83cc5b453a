"""`longcat validate`: one-off renders with the validation settings, optional start image and LoRAs."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from longcat_train.config import LoadedConfig, TrainingConfig, parse_resolution
from longcat_train.data import ClipItem, DataSpec, scan_dataset
from longcat_train.lora import read_lora
from longcat_train.model.attention import flash4_install_hint

from .outputs import RENDER_FPS, RenderFiles, render_stem, write_render
from .periodic import ValidationCase, continuation_case, validation_cases
from .previews import PreviewRenderer, distill_lora_path, refinement_lora_path
from .refine import REFINED_FPS, refine_size
from .render import RenderResult, RenderSettings, fit_pixels, load_start_image

# The cfg_step LoRA was distilled for 16 steps without CFG (the official pipeline's defaults for it).
DISTILLED_STEPS = 16
DISTILLED_GUIDANCE = 1.0


def _render_training(
    training: TrainingConfig,
    prompt: str | None,
    resolution: str | tuple[int, int] | None,
    frames: int | None,
    steps: int | None,
    guidance: float | None,
    seed: int | None,
    distilled: bool,
) -> TrainingConfig:
    """The training settings with the command's render options laid over the `validation_*` keys."""
    update: dict[str, object] = {}
    if resolution is not None:
        height, width = parse_resolution(resolution) if isinstance(resolution, str) else resolution
        update["validation_resolution"] = f"{height}x{width}"
    steps = steps if steps is not None or not distilled else DISTILLED_STEPS
    guidance = guidance if guidance is not None or not distilled else DISTILLED_GUIDANCE
    for key, value in (("validation_prompt", prompt), ("validation_num_video_frames", frames),
                       ("validation_num_inference_steps", steps), ("validation_guidance", guidance),
                       ("validation_seed", seed)):
        if value is not None:
            update[key] = value
    return training.model_copy(update=update)


def _eval_items(loaded: LoadedConfig) -> list[ClipItem]:
    training = loaded.training
    if not training.validation_using_datasets or loaded.eval_dataset is None:
        return []
    alignment = training.aspect_bucket_alignment
    specs = {d.id: DataSpec.from_dataset_config(d, alignment=alignment) for d in loaded.datasets}
    start_frames = {i: s for i, s in specs.items() if s.kind.gives_start_frames}
    return scan_dataset(specs[loaded.eval_dataset.id], start_frames, seed=training.seed).items


def _cases(loaded: LoadedConfig, training: TrainingConfig, image: Path | None, video: Path | None,
           prompt: str | None) -> list[ValidationCase]:
    size = training.validation_size
    if image is not None and video is not None:
        raise ValueError("give --image (image-to-video) or --video (continuation), not both")
    source = image if image is not None else video
    if source is not None:
        text = prompt if prompt is not None else training.validation_prompt
        if text is None:
            option = "--image" if image is not None else "--video"
            raise ValueError(f"{option} {source} needs a prompt: pass --prompt TEXT or set validation_prompt")
        if video is not None:
            return [continuation_case(0, text, video, training.validation_continuation_cond_frames, size)]
        return [ValidationCase(render_stem(0, text), text, load_start_image(source, *size), size)]
    if prompt is not None:
        return [ValidationCase(render_stem(0, prompt), prompt, None, size)]
    cases = validation_cases(training, _eval_items(loaded), loaded.prompt_entries)
    if not cases:
        raise ValueError(
            f"nothing to render from {loaded.config_path}: pass --prompt (and --image for image-to-video), "
            "set validation_prompt or validation_prompt_file, or set validation_using_datasets with an "
            "eval_dataset_id that has clips"
        )
    return cases


def run_validate(
    loaded: LoadedConfig,
    loras: Sequence[tuple[Path, float]] = (),
    image: Path | None = None,
    prompt: str | None = None,
    resolution: str | tuple[int, int] | None = None,
    frames: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int | None = None,
    distilled: bool = False,
    fp8: bool = False,
    output: Path | None = None,
    device: str | torch.device | None = None,
    console: Console | None = None,
    video: Path | None = None,
    refine: bool = False,
    spatial_only: bool = False,
) -> list[Path]:
    """Render and write mp4 + contact sheet per video; returns the written paths (mp4, png, ...).

    Options left None come from the `validation_*` keys (`--distilled`: 16 steps, guidance 1
    unless given, and the checkpoint's cfg_step LoRA, applied once even when also in `loras`).
    With `image` it renders image-to-video from it with `prompt` (or `validation_prompt`); with
    `video`, the continuation of its last `validation_continuation_cond_frames` frames; with only
    `prompt`, text-to-video; with none, what periodic validation renders. LoRAs apply as forward
    hooks with their strengths (0 = no effect).
    `refine`: each render then goes through the official refinement stage (`PreviewRenderer.refine`:
    720p, 30 fps, or 15 with `spatial_only`), written beside it as `<stem>_refined`; an
    image-to-video render's start image conditions its refinement too. (The official demos refine
    a distilled stage 1; any stage 1 is refined here.)
    Output goes to `output`, default `output_dir/validation/validate_<time>/`.
    """
    console = console or Console()
    renderer = PreviewRenderer(loaded, device, fp8=fp8)
    if renderer.device.type == "cuda" and (hint := flash4_install_hint()):
        console.print(hint)
    if refine:  # a missing refinement LoRA stops the command before any render
        refinement_lora_path(loaded.model_dir)
    if distilled:  # the renderer applies the checkpoint's own copy
        distill_lora = distill_lora_path(loaded.model_dir).resolve()
        loras = [(path, strength) for path, strength in loras if path.resolve() != distill_lora]
    training = _render_training(loaded.training, prompt, resolution, frames, steps, guidance, seed, distilled)
    cases = _cases(loaded, training, image, video, prompt)
    settings = replace(RenderSettings.from_training(training, shift=renderer.shift), distilled=distilled)
    negative_prompt = training.validation_negative_prompt or ""
    # every prompt before the model loads: one text-encoder load, never beside the DiT
    renderer.encode([negative_prompt, *(case.prompt for case in cases)])
    lora_weights = [(read_lora(path).weights, strength) for path, strength in loras]

    directory = output or Path(training.output_dir) / "validation" / time.strftime("validate_%Y%m%d-%H%M%S")
    written: list[Path] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=not console.is_terminal) as progress:
        for case in cases:
            task = progress.add_task(f"render {case.stem}", total=settings.steps)
            result = renderer.render(
                case.prompt, settings.sized(*case.size), case.start_pixels, lora_weights, negative_prompt,
                on_step=lambda done, total, task=task: progress.update(task, completed=done, total=total),
                condition_frames=case.condition_frames,
            )
            files = write_render(directory, case.stem, result.frames)
            written.extend(files.paths())
            notes = [] if result.first_frame_psnr is None else [f"first-frame PSNR {result.first_frame_psnr:.2f} dB"]
            if settings.step_cache:
                notes.append(f"step cache skipped {result.skipped_steps} of {settings.steps} steps")
            noted = f" ({'; '.join(notes)})" if notes else ""
            progress.console.print(f"wrote {files.video} and {files.sheet}{noted}")
            if refine:
                written.extend(_refine(renderer, progress, directory, case, result, settings, spatial_only).paths())
    return written


def _refine(renderer: PreviewRenderer, progress: Progress, directory: Path, case: ValidationCase,
            stage1: RenderResult, settings: RenderSettings, spatial_only: bool) -> RenderFiles:
    """The refined render of `case`'s stage-1 render, written as `<stem>_refined`."""
    task = progress.add_task(f"refine {case.stem}", total=None)
    size = refine_size(*case.size)
    condition = None if case.start_pixels is None else fit_pixels(case.start_pixels, *size)
    result = renderer.refine(
        case.prompt, stage1, settings.seed, condition, spatial_only=spatial_only, tiling=settings.tiling,
        on_step=lambda done, total: progress.update(task, completed=done, total=total),
    )
    files = write_render(directory, f"{case.stem}_refined", result.frames,
                         fps=RENDER_FPS if spatial_only else REFINED_FPS)
    progress.console.print(f"wrote {files.video} and {files.sheet} ({size[0]}x{size[1]})")
    return files
