"""A small training project on the tiny checkpoint for the validation tests: config pair, a
train and an eval dataset of short real clips (with captions), renders at 64x64, 9 frames."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from longcat_train.config import LoadedConfig, load_config

from .media_factory import write_clip

RENDER = {"validation_resolution": "64x64", "validation_num_video_frames": 9,
          "validation_num_inference_steps": 2, "validation_guidance": 4.0}


def write_project(root: Path, checkpoint: Path, **training: Any) -> LoadedConfig:
    for name, caption in (("clips", "a red square slides right"), ("val", "a blue square turns green")):
        folder = root / "data" / name
        for index in range(2):
            write_clip(folder / f"{name}{index}.mp4", count=20, fps=15, height=64, width=64)
            (folder / f"{name}{index}.txt").write_text(f"{caption} {index}", encoding="utf-8")
    datasets = [
        {"id": dataset_id, "dataset_type": "video", "is_i2v": True, "instance_data_dir": f"data/{folder}",
         "resolution": 64, "video": {"num_frames": 9}}
        for dataset_id, folder in (("clips", "clips"), ("clips-val", "val"))
    ]
    settings = {
        "pretrained_model_name_or_path": str(checkpoint), "output_dir": "out", "mixed_precision": "no",
        "aspect_bucket_alignment": 32, "validation_prompt": "a cat walks slowly", "seed": 3, **RENDER, **training,
    }
    (root / "multidatabackend.json").write_text(json.dumps(datasets), encoding="utf-8")
    (root / "config.json").write_text(json.dumps(settings), encoding="utf-8")
    return load_config(root / "config.json")
