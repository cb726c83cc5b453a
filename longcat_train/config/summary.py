"""A short rich rendering of what a loaded config will do (for `config check` and friends)."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Group
from rich.table import Column

from longcat_train.config.loading import LoadedConfig
from longcat_train.config.problems import ValueTable
from longcat_train.config.simpletuner import SIMPLETUNER_DATASET_DEFAULTS, defaults_left_unset
from longcat_train.config.training import TrainingConfig


def _length(loaded: LoadedConfig) -> str:
    training = loaded.training
    if training.max_train_steps is not None:
        return f"{training.max_train_steps} steps"
    return f"{training.num_train_epochs} epoch(s)"


def _continuation(training: TrainingConfig) -> str:
    video = training.validation_continuation_video
    return "" if video is None else f", continuing {video.name} from its last {training.validation_continuation_cond_frames} frames"


def config_summary(loaded: LoadedConfig) -> Group:
    training = loaded.training
    settings = ValueTable(Column(style="bold"), Column(), box=None, show_header=False, padding=(0, 2), pad_edge=False)
    rows = [
        ("config", str(loaded.config_path)),
        ("datasets file", str(loaded.backend_path)),
        ("checkpoint", str(loaded.model_dir)),
        ("output", str(training.output_dir)),
        ("model", f"{training.model_family} / {training.model_flavour}, base weights {training.base_model_precision}"),
        ("LoRA", f"rank {training.lora_rank}, alpha {training.effective_lora_alpha:g}, "
                 f"{len(training.lora_target_modules)} target module names"),
        ("training", f"{_length(loaded)}, batch {training.train_batch_size} x {training.gradient_accumulation_steps}, "
                     f"lr {training.learning_rate:g} ({training.lr_scheduler}), seed {training.seed}"),
        ("validation", f"{training.validation_resolution} x {training.validation_num_video_frames} frames, "
                       f"{training.validation_num_inference_steps} steps, guidance {training.validation_guidance:g}, "
                       f"every {training.validation_step_interval or '-'} steps"
                       + _continuation(training)),
        ("memory", f"block swap {training.musubi_blocks_to_swap}, group offload "
                   f"{training.group_offload_type if training.enable_group_offload else 'off'}, "
                   f"gradient checkpointing {'on' if training.gradient_checkpointing else 'off'}"),
    ]
    for name, value in rows:
        settings.add_row(name, value)

    datasets = ValueTable("id", "type", "role", "frames", "resolution", "directory", title="datasets",
                          title_justify="left")
    trained = {d.id for d in loaded.training_datasets}
    for dataset in loaded.datasets:
        if dataset.id == training.eval_dataset_id:
            role = "validation split"
        elif dataset.id in trained:
            role = f"train, i2v {dataset.i2v_probability:.0%}" if dataset.kind.takes_start_frames else "train"
        else:
            role = dataset.kind.role
        frames = str(dataset.num_frames) if dataset.kind.moving else "1"
        datasets.add_row(
            dataset.id, dataset.dataset_type, role, frames,
            f"{dataset.resolution:g} {dataset.resolution_type}", str(dataset.instance_data_dir),
        )
    parts = [settings, datasets]
    unset = differing_defaults(loaded)
    if unset:
        defaults = ValueTable("key", "here", "SimpleTuner", "datasets", "what it changes",
                              title="defaults that differ from SimpleTuner's, left unset (set them to keep SimpleTuner's)",
                              title_justify="left")
        for row in unset:
            defaults.add_row(row["key"], json.dumps(row["here"]), json.dumps(row["simpletuner"]),
                             ", ".join(row["datasets"]), row["meaning"])
        parts.append(defaults)
    return Group(*parts)


def differing_defaults(loaded: LoadedConfig) -> list[dict[str, Any]]:
    """The dataset keys whose default differs from SimpleTuner's and that some dataset leaves unset."""
    rows = []
    for key, ids in defaults_left_unset(loaded.datasets).items():
        theirs, meaning = SIMPLETUNER_DATASET_DEFAULTS[key]
        here = type(loaded.datasets[0]).model_fields[key].default
        rows.append({"key": key, "here": here, "simpletuner": theirs, "datasets": ids, "meaning": meaning})
    return rows
