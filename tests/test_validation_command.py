"""`run_validate` (what `longcat validate` calls) on the tiny checkpoint, through real files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from typer.testing import CliRunner

from longcat_train.cli import EXIT_CONFIG_ERROR, app
from longcat_train.lora import write_lora
from longcat_train.lora.formats import LoraModule, LoraWeights
from longcat_train.model import LongCatVideoTransformer3DModel
from longcat_train.release_facts import CFG_STEP_LORA, REFINEMENT_LORA
from longcat_train.validation.command import run_validate

from .media_factory import read_index, read_video, write_clip
from .validation_project import write_project


def sheet_pixels(paths: list[Path]) -> np.ndarray:
    return np.asarray(Image.open(paths[1]))


def _lora_file(path: Path, checkpoint: Path, scale: float = 0.5, file_format: str = "comfyui") -> Path:
    transformer = LongCatVideoTransformer3DModel.from_pretrained(checkpoint, subfolder="dit")
    generator = torch.Generator().manual_seed(1)
    modules = {
        name: LoraModule(torch.randn(4, m.in_features, generator=generator) * 0.5,
                         torch.randn(m.out_features, 4, generator=generator) * scale, alpha=4.0)
        for name, m in transformer.named_modules() if name.endswith("ffn.w2")
    }
    return write_lora(path, LoraWeights(modules), file_format)


def _checkpoint_with_distill_lora(root: Path, tiny_model: Path, scale: float, relative: str = CFG_STEP_LORA) -> Path:
    """The tiny checkpoint (its folders linked) with an official-format LoRA of `scale` at
    `relative` (default the cfg_step LoRA)."""
    root.mkdir()
    for folder in tiny_model.iterdir():
        (root / folder.name).symlink_to(folder)
    _lora_file(root / relative, tiny_model, scale, "official")
    return root


RUNNER = CliRunner()


def test_image_to_video_mp4_reads_back_with_the_requested_frames_fps_and_size(tmp_path, tiny_model) -> None:
    loaded = write_project(tmp_path, tiny_model)
    image = tmp_path / "start.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(image)
    options = {"image": image, "prompt": "a boat on a lake", "resolution": "64x96", "frames": 13, "steps": 1}
    paths = run_validate(loaded, output=tmp_path / "plain", **options)
    video, sheet = paths
    frames, fps = read_video(video)
    assert frames.shape == (13, 64, 96, 3) and fps == 15
    assert video.suffix == ".mp4" and sheet.suffix == ".png" and Image.open(sheet).size == (4 * 96, 2 * 64)

    lora = _lora_file(tmp_path / "style.safetensors", tiny_model)
    off = run_validate(loaded, [(lora, 0.0)], output=tmp_path / "off", **options)
    on = run_validate(loaded, [(lora, 1.0)], output=tmp_path / "on", **options)
    # compared through the lossless contact sheets: x264's threaded encoder may pick another
    # encoding of the same frames from run to run
    assert np.array_equal(sheet_pixels(off), sheet_pixels(paths))
    assert not np.array_equal(sheet_pixels(on), sheet_pixels(paths))


def test_without_image_or_prompt_it_renders_the_eval_split(tmp_path, tiny_model) -> None:
    loaded = write_project(tmp_path, tiny_model, validation_using_datasets=True, eval_dataset_id="clips-val")
    paths = run_validate(loaded, steps=1)
    assert [p.name for p in paths] == [
        "00_a-blue-square-turns-green-0.mp4", "00_a-blue-square-turns-green-0.png",
        "01_a-blue-square-turns-green-1.mp4", "01_a-blue-square-turns-green-1.png",
    ]
    assert all(p.parent.parent == loaded.training.output_dir / "validation" for p in paths)
    assert read_video(paths[0])[0].shape == (9, 64, 64, 3)


def test_an_image_without_any_prompt_is_refused_by_name(tmp_path, tiny_model) -> None:
    loaded = write_project(tmp_path, tiny_model, validation_prompt=None)
    with pytest.raises(ValueError, match="start.png needs a prompt"):
        run_validate(loaded, image=tmp_path / "start.png")


def test_prompt_file_renders_each_prompt_with_its_start_image(tmp_path, tiny_model) -> None:
    Image.fromarray(np.full((40, 60, 3), 220, dtype=np.uint8)).save(tmp_path / "start.png")
    (tmp_path / "prompts.txt").write_text("a red ball --i start.png\na green field\n", encoding="utf-8")
    loaded = write_project(tmp_path, tiny_model, validation_prompt=None,
                           validation_prompt_file=str(tmp_path / "prompts.txt"))
    paths = run_validate(loaded, resolution="32x48", frames=5, steps=1, output=tmp_path / "renders")
    assert [p.name for p in paths] == ["00_a-red-ball.mp4", "00_a-red-ball.png",
                                       "01_a-green-field.mp4", "01_a-green-field.png"]
    assert read_video(paths[0])[0].shape == (5, 32, 48, 3)


def test_validate_video_writes_the_condition_frames_then_the_continuation(tmp_path, tiny_model) -> None:
    loaded = write_project(tmp_path, tiny_model)
    clip = write_clip(tmp_path / "long.mp4", count=20, fps=15, height=48, width=64)
    result = RUNNER.invoke(app, ["validate", "--config", str(loaded.config_path), "--video", str(clip),
                                 "--cond-frames", "5", "--resolution", "32x48", "--frames", "13", "--steps", "2"])
    assert result.exit_code == 0, result.output
    [video] = (loaded.training.output_dir / "validation").glob("validate_*/*.mp4")
    frames, fps = read_video(video)
    assert frames.shape == (13, 32, 48, 3) and fps == 15
    # the clip's last five frames (index-coded flat colours) open the render, then new frames follow
    assert [read_index(frame) for frame in frames[:5]] == [15, 16, 17, 18, 19]
    assert np.abs(frames[5:].astype(int) - frames[4].astype(int)).mean() > 10


def test_validate_video_problems_name_the_options_before_loading_the_model(tmp_path, tiny_model) -> None:
    loaded = write_project(tmp_path, tiny_model)
    short = write_clip(tmp_path / "short.mp4", count=3, fps=15)
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    for args, option, expected in (
        (["--video", str(short)], "--video", "has 3 frames at 15 fps"),
        (["--video", str(tmp_path / "broken.mp4")], "--video", "cannot be decoded"),
        (["--video", str(tmp_path / "missing.mp4")], "--video", "file does not exist"),
        (["--video", str(short), "--cond-frames", "6"], "--cond-frames", "(frames - 1) % 4 == 0"),
        (["--video", str(short), "--cond-frames", "9", "--frames", "9"], "--cond-frames", "leave no new frame"),
        (["--cond-frames", "5"], "--cond-frames", "there is no clip to continue"),
    ):
        result = RUNNER.invoke(app, ["validate", "--config", str(loaded.config_path), *args], env={"COLUMNS": "250"})
        assert result.exit_code == EXIT_CONFIG_ERROR, result.output
        rows = [line for line in result.output.splitlines() if "│" in line]
        assert any(option in row and expected in row for row in rows), result.output
    assert not (loaded.training.output_dir / "validation").exists()


def test_distilled_without_the_cfg_step_lora_is_refused_by_name_before_loading(tmp_path, tiny_model) -> None:
    loaded = write_project(tmp_path, tiny_model)
    result = RUNNER.invoke(app, ["validate", "--config", str(loaded.config_path), "--distilled"],
                           env={"COLUMNS": "250"})
    assert result.exit_code == EXIT_CONFIG_ERROR, result.output
    assert "--distilled" in result.output and "cfg_step_lora.safetensors" in result.output
    assert not (loaded.training.output_dir / "validation").exists()


def test_distilled_renders_apply_the_checkpoints_cfg_step_lora_once(tmp_path, tiny_model) -> None:
    options = {"prompt": "a boat on a lake", "resolution": "32x48", "frames": 5, "distilled": True}
    base = _checkpoint_with_distill_lora(tmp_path / "zero_lora", tiny_model, 0.0)  # a LoRA that changes nothing
    plain = run_validate(write_project(tmp_path / "a", base), output=tmp_path / "plain", **options)
    checkpoint = _checkpoint_with_distill_lora(tmp_path / "with_lora", tiny_model, 0.5)
    loaded = write_project(tmp_path / "b", checkpoint)
    distilled = run_validate(loaded, output=tmp_path / "distilled", **options)
    assert not np.array_equal(sheet_pixels(distilled), sheet_pixels(plain))
    # passed again with --lora, the checkpoint's own file is not applied twice
    again = run_validate(loaded, [(checkpoint / CFG_STEP_LORA, 1.0)], output=tmp_path / "again", **options)
    assert np.array_equal(sheet_pixels(again), sheet_pixels(distilled))
    # a copy elsewhere at strength −1 takes the checkpoint's LoRA back out: it was applied at strength 1
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes((checkpoint / CFG_STEP_LORA).read_bytes())
    undone = run_validate(loaded, [(copy, -1.0)], output=tmp_path / "undone", **options)
    assert np.abs(sheet_pixels(undone).astype(int) - sheet_pixels(plain).astype(int)).max() <= 1


def test_fp8_matmuls_off_a_gpu_are_refused_before_anything_loads(tmp_path, tiny_model) -> None:
    loaded = write_project(tmp_path, tiny_model)
    with pytest.raises(ValueError, match="FP8 matmuls need a CUDA GPU"):
        run_validate(loaded, prompt="a boat", fp8=True, device="cpu", output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_step_cache_option_reports_the_steps_it_skipped(tmp_path, tiny_model) -> None:
    loaded = write_project(tmp_path, tiny_model, validation_step_cache=1.0)
    console = Console(record=True, width=200)
    run_validate(loaded, prompt="a boat", resolution="64x96", frames=5,
                 steps=3, output=tmp_path / "out", console=console)
    assert "step cache skipped 2 of 3 steps" in " ".join(console.export_text().split())


def test_refine_writes_the_refined_render_at_30_fps_with_twice_the_frames_beside_the_render(
        tmp_path, tiny_model, monkeypatch) -> None:
    # one small size in place of the 720p table (whose rule tests/test_refine.py checks against the
    # official choices): at 960x960 the tiny VAE alone takes a minute on two cores
    monkeypatch.setattr("longcat_train.validation.refine.REFINE_SIZES", ((128, 128),))
    checkpoint = _checkpoint_with_distill_lora(tmp_path / "checkpoint", tiny_model, 0.5, REFINEMENT_LORA)
    loaded = write_project(tmp_path / "project", checkpoint)
    result = RUNNER.invoke(app, ["validate", "--config", str(loaded.config_path), "--prompt", "a boat on a lake",
                                 "--resolution", "64x64", "--frames", "5", "--steps", "1", "--refine"],
                           env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    render, refined = sorted((loaded.training.output_dir / "validation").glob("validate_*/*.mp4"))
    assert refined.name == render.name.replace(".mp4", "_refined.mp4")
    frames, fps = read_video(render)
    assert (frames.shape, fps) == ((5, 64, 64, 3), 15.0)
    frames, fps = read_video(refined)
    assert (frames.shape, fps) == ((10, 128, 128, 3), 30.0)
    assert refined.with_suffix(".png").is_file()


def test_refine_without_the_refinement_lora_is_refused_by_name_before_loading(tmp_path, tiny_model) -> None:
    loaded = write_project(tmp_path, tiny_model)
    result = RUNNER.invoke(app, ["validate", "--config", str(loaded.config_path), "--refine"], env={"COLUMNS": "250"})
    assert result.exit_code == EXIT_CONFIG_ERROR, result.output
    assert "--refine" in result.output and "refinement_lora.safetensors" in result.output
    assert not (loaded.training.output_dir / "validation").exists()
    result = RUNNER.invoke(app, ["validate", "--config", str(loaded.config_path), "--spatial-only"],
                           env={"COLUMNS": "250"})
    assert result.exit_code == EXIT_CONFIG_ERROR and "--spatial-only" in result.output, result.output
