"""A valid config pair on disk (real folders, a checkpoint folder in the official layout) that
tests mutate one key at a time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

UMT5_ENCODER_CONFIG = {"model_type": "umt5", "architectures": ["UMT5EncoderModel"], "d_model": 4096}


def write_checkpoint(root: Path, text_encoder_config: dict[str, Any] | None = None) -> Path:
    """The official layout's folders with the files that mark them (no weights needed to check)."""
    for folder, marker in (
        ("dit", "config.json"),
        ("vae", "config.json"),
        ("tokenizer", "tokenizer_config.json"),
        ("scheduler", "scheduler_config.json"),
    ):
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / marker).write_text("{}", encoding="utf-8")
    (root / "text_encoder").mkdir(parents=True, exist_ok=True)
    (root / "text_encoder" / "config.json").write_text(
        json.dumps(text_encoder_config or UMT5_ENCODER_CONFIG), encoding="utf-8"
    )
    return root


def base_training(root: Path) -> dict[str, Any]:
    return {
        "model_family": "longcat_video",
        "model_flavour": "final",
        "model_type": "lora",
        "pretrained_model_name_or_path": str(root / "ckpt"),
        "output_dir": "out",
        "data_backend_config": "multidatabackend.json",
        "lora_rank": 8,
        "learning_rate": 1e-4,
        "max_train_steps": 10,
        "aspect_bucket_alignment": 32,
        "validation_resolution": "480x832",
        "validation_num_video_frames": 93,
        "validation_using_datasets": True,
        "eval_dataset_id": "clips-val",
    }


def base_datasets() -> list[dict[str, Any]]:
    return [
        {
            "id": "clips",
            "type": "local",
            "dataset_type": "video",
            "is_i2v": True,
            "instance_data_dir": "data/clips",
            "caption_strategy": "textfile",
            "resolution": 480,
            "conditioning_data": ["start-frames"],
            "video": {"num_frames": 93},
        },
        {
            "id": "start-frames",
            "type": "local",
            "dataset_type": "conditioning",
            "instance_data_dir": "data/start_frames",
            "caption_strategy": None,
            "resolution": 480,
        },
        {
            "id": "clips-val",
            "type": "local",
            "dataset_type": "video",
            "is_i2v": True,
            "instance_data_dir": "data/val",
            "resolution": 480,
            "conditioning_data": ["start-frames"],
        },
    ]


def write_pair(root: Path, training: dict[str, Any], datasets: Any) -> Path:
    """Write config.json + multidatabackend.json under `root` and make every dataset folder."""
    for folder in ("data/clips", "data/start_frames", "data/val"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    write_checkpoint(root / "ckpt")
    (root / "multidatabackend.json").write_text(json.dumps(datasets, indent=2), encoding="utf-8")
    config = root / "config.json"
    config.write_text(json.dumps(training, indent=2), encoding="utf-8")
    return config
