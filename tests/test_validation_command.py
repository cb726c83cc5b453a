"""`run_validate` (what `longcat validate` calls) on the tiny checkpoint, through real files."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from longcat_train.lora import write_lora
from longcat_train.lora.formats import LoraModule, LoraWeights
from longcat_train.model import LongCatVideoTransformer3DModel
from longcat_train.validation.command import run_validate

from .validation_project import write_project


def _read_video(path: Path) -> tuple[np.ndarray, float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        return frames, float(stream.average_rate)


def sheet_pixels(paths: list[Path]) -> np.ndarray:
    return np.asarray(Image.open(paths[1]))


def _lora_file(path: Path, checkpoint: Path) -> Path:
    transformer = LongCatVideoTransformer3DModel.from_pretrained(checkpoint, subfolder="dit")
    generator = torch.Generator().manual_seed(1)
    modules = {
        name: LoraModule(torch.randn(4, m.in_features, generator=generator) * 0.5,
                         torch.randn(m.out_features, 4, generator=generator) * 0.5, alpha=4.0)
        for name, m in transformer.named_modules() if name.endswith("ffn.w2")
    }
    return write_lora(path, LoraWeights(modules), "comfyui")


def test_image_to_video_mp4_reads_back_with_the_requested_frames_fps_and_size(tmp_path, tiny_model) -> None:
    loaded = write_project(tmp_path, tiny_model)
    image = tmp_path / "start.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(image)
    options = {"image": image, "prompt": "a boat on a lake", "resolution": "64x96", "frames": 13, "steps": 1}
    paths = run_validate(loaded, output=tmp_path / "plain", **options)
    video, sheet = paths
    frames, fps = _read_video(video)
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
    assert _read_video(paths[0])[0].shape == (9, 64, 64, 3)


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
    assert _read_video(paths[0])[0].shape == (5, 32, 48, 3)


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
