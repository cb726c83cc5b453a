"""`longcat demo`: a tiny random LongCat-Video in the official layout, a synthetic paired clip
dataset made with PyAV, and configs that run the real `train` path on the CPU in a few minutes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..video_io import write_video
from .tiny_model import write_tiny_model

COLOURS = [(230, 60, 50), (40, 160, 90), (50, 90, 220), (240, 200, 40), (180, 70, 200), (30, 190, 200)]
SHAPES = {"square": (64, 64), "wide": (64, 96)}  # (height, width) of the source clips


def synthetic_clip(index: int, height: int, width: int, frames: int = 34) -> np.ndarray:
    """A coloured square moving over a two-tone background: simple, learnable motion."""
    rng = np.random.default_rng(index)
    background = np.array(COLOURS[index % len(COLOURS)], dtype=np.float32) * 0.35
    colour = np.array(COLOURS[(index + 3) % len(COLOURS)], dtype=np.uint8)
    size = height // 3
    x0, y0 = rng.integers(0, width - size), rng.integers(0, height - size)
    dx, dy = rng.choice([-2, -1, 1, 2]), rng.choice([-1, 1])
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    ramp = np.linspace(0.7, 1.3, width, dtype=np.float32)[None, :, None]
    for f in range(frames):
        frame = np.clip(background[None, None, :] * ramp, 0, 255).repeat(height, 0).astype(np.uint8)
        x = int(np.clip(x0 + dx * f, 0, width - size))
        y = int(np.clip(y0 + dy * f, 0, height - size))
        frame[y : y + size, x : x + size] = colour
        video[f] = frame
    return video


def write_dataset(root: Path, count: int = 6, val_count: int = 1, shapes: dict[str, tuple[int, int]] = SHAPES,
                  frames: int = 34) -> None:
    """clips/NAME.mp4 + NAME.txt with start_frames/NAME.png (the clip's first frame), 30 fps
    sources of `frames` frames (resampled to 15 fps by the loader), cycling through `shapes`
    (name: (height, width)), and a held-out split laid out the same way."""
    for split, first, n in (("train", 0, count), ("val", 100, val_count)):
        clips, starts = root / split / "clips", root / split / "start_frames"
        clips.mkdir(parents=True, exist_ok=True)
        starts.mkdir(parents=True, exist_ok=True)
        for i in range(first, first + n):
            shape = list(shapes)[i % len(shapes)]
            video = synthetic_clip(i, *shapes[shape], frames=frames)
            name = f"clip_{i:03d}"
            write_video(clips / f"{name}.mp4", video, fps=30)
            (clips / f"{name}.txt").write_text(f"a {shape} scene with a coloured square sliding across, clip {i}")
            Image.fromarray(video[0]).save(starts / f"{name}.png")


def demo_configs(root: Path, model: Path, steps: int = 300, resolution: int = 64, num_frames: int = 17,
                 overrides: dict | None = None) -> Path:
    """config.json + multidatabackend.json under `root` for the clips of `write_dataset`, bucketed
    at `resolution` (the shorter edge, pixels) and `num_frames`; `overrides` replace config keys."""
    def dataset(split: str, clip_id: str, start_id: str) -> list[dict]:
        return [
            {"id": clip_id, "type": "local", "dataset_type": "video", "is_i2v": True,
             "instance_data_dir": f"data/{split}/clips", "caption_strategy": "textfile", "resolution": resolution,
             "resolution_type": "pixel", "cache_dir_vae": f"cache/vae/{clip_id}", "conditioning_data": [start_id],
             "caption_dropout_probability": 0.0, "video": {"num_frames": num_frames}},
            {"id": start_id, "type": "local", "dataset_type": "conditioning",
             "instance_data_dir": f"data/{split}/start_frames", "caption_strategy": None, "resolution": resolution,
             "cache_dir_vae": f"cache/vae/{start_id}"},
        ]

    backend = [*dataset("train", "clips", "start-frames"), *dataset("val", "clips-val", "start-frames-val"),
               {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True,
                "cache_dir": "cache/text"}]
    config = {
        "model_family": "longcat_video", "model_flavour": "final", "model_type": "lora",
        # relative to the config's folder, as relative paths are read: the project works from any shell folder
        "pretrained_model_name_or_path": os.path.relpath(Path(model).resolve(), Path(root).resolve()),
        "base_model_precision": "no_change",
        "mixed_precision": "no", "output_dir": "output", "data_backend_config": "multidatabackend.json",
        "train_batch_size": 1, "gradient_checkpointing": False, "lora_rank": 16, "learning_rate": 2e-3,
        "max_train_steps": steps, "seed": 42, "checkpoint_step_interval": steps // 2,
        "checkpoints_total_limit": 2, "aspect_bucket_alignment": 32, "report_to": "tensorboard",
        "validation_prompt": "a square scene with a coloured square sliding across",
        "validation_resolution": "64x64", "validation_num_video_frames": 17,
        "validation_num_inference_steps": 4, "validation_guidance": 4.0,
        "validation_using_datasets": True, "eval_dataset_id": "clips-val", "validation_step_interval": steps,
        **(overrides or {}),
    }
    (root / "multidatabackend.json").write_text(json.dumps(backend, indent=2))
    path = root / "config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def write_demo(root: Path, steps: int = 300) -> Path:
    """Everything `longcat demo` trains on, under `root`; returns the config path."""
    root = Path(root)
    model = write_tiny_model(root / "model")
    write_dataset(root / "data")
    return demo_configs(root, model, steps)
