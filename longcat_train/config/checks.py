"""Checks across keys and files, and against the filesystem; each adds problems, none raises.

They run on whatever validated (entries that failed validation take part through their raw
`id` and `dataset_type` only), so one broken key never hides the problems behind it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longcat_train.config.dataset_types import kind_of, names_where
from longcat_train.config.datasets import DatasetConfig, TextEmbedsConfig
from longcat_train.config.dependencies import PRECISION_REQUIREMENTS, REPORT_TO_REQUIREMENTS, missing_requirement
from longcat_train.config.model_paths import check_checkpoint_dir
from longcat_train.config.problems import ProblemList
from longcat_train.config.rules import PIXEL_MULTIPLE
from longcat_train.config.training import ATTENTION_CHOICES, TrainingConfig
from longcat_train.config.continuation_video import check_continuation_video
from longcat_train.release_facts import BLOCK_LINEARS, PROJECTION_MODULES


@dataclass(frozen=True)
class BackendEntry:
    """One entry of `multidatabackend.json`: its position, raw table and validated model (if any)."""

    index: int
    raw: Any
    model: DatasetConfig | TextEmbedsConfig | None

    @property
    def key(self) -> str:
        return f"datasets[{self.index}]"

    @property
    def raw_id(self) -> str | None:
        value = self.raw.get("id") if isinstance(self.raw, dict) else None
        return value if isinstance(value, str) else None

    @property
    def raw_type(self) -> str | None:
        value = self.raw.get("dataset_type", "video") if isinstance(self.raw, dict) else None
        return value if isinstance(value, str) else None

    @property
    def disabled(self) -> bool:
        return isinstance(self.raw, dict) and self.raw.get("disabled") is True

    @property
    def dataset(self) -> DatasetConfig | None:
        return self.model if isinstance(self.model, DatasetConfig) else None


def check_training(training: TrainingConfig, file: Path, problems: ProblemList) -> None:
    if training.max_train_steps is None and training.num_train_epochs is None:
        problems.add(
            file,
            "max_train_steps",
            None,
            "neither max_train_steps nor num_train_epochs is set, so training has no end",
            "set max_train_steps (e.g. 2000) or num_train_epochs (e.g. 10)",
        )
    _check_lora_targets(training, file, problems)
    _check_kept_projections(training, file, problems)
    _check_dependencies(training, file, problems)
    _check_sharding(training, file, problems)
    if training.validation_using_datasets and training.eval_dataset_id is None:
        problems.add(
            file,
            "eval_dataset_id",
            None,
            "validation_using_datasets is true but no eval_dataset_id names the validation split",
            "set eval_dataset_id to the id of a held-out dataset in multidatabackend.json",
        )
    _check_continuation(training, file, problems)


def _check_continuation(training: TrainingConfig, file: Path, problems: ProblemList) -> None:
    """A continuation needs a prompt and at least one new latent frame after its condition frames."""
    if training.validation_continuation_video is None:
        return
    if training.validation_prompt is None:
        problems.add(file, "validation_continuation_video", str(training.validation_continuation_video),
                     "a continuation renders with validation_prompt, which is not set",
                     "set validation_prompt to what happens next in the clip")
    cond, frames = training.validation_continuation_cond_frames, training.validation_num_video_frames
    if cond >= frames:
        problems.add(file, "validation_continuation_cond_frames", cond,
                     f"{cond} condition frames leave no new frame in a render of validation_num_video_frames {frames}",
                     f"use fewer condition frames (1 + 4k, below {frames}) or render more frames")


def _check_dependencies(training: TrainingConfig, file: Path, problems: ProblemList) -> None:
    """Each value backed by an optional package, checked now rather than after caching."""
    for key, value, requirement in (
        ("attention_implementation", training.attention_implementation,
         ATTENTION_CHOICES[training.attention_implementation].requires),
        ("report_to", training.report_to, REPORT_TO_REQUIREMENTS.get(training.report_to)),
        ("base_model_precision", training.base_model_precision, PRECISION_REQUIREMENTS.get(training.base_model_precision)),
    ):
        missing = missing_requirement(key, value, requirement, file)
        if missing is not None:
            problems.add(*missing)


def _check_lora_targets(training: TrainingConfig, file: Path, problems: ProblemList) -> None:
    """Only a block's linears can carry a LoRA: any other name would adapt nothing (PEFT matches
    `blocks.N.<name>` whole, see `lora.adapters.target_regex`)."""
    unknown = [t for t in training.lora_target_modules if t not in BLOCK_LINEARS]
    if unknown:
        problems.add(file, "lora_target_modules", unknown,
                     f"{unknown} name no linear of a LongCat-Video block, so a LoRA there would adapt nothing",
                     f"use names from {list(BLOCK_LINEARS)}")


def _check_sharding(training: TrainingConfig, file: Path, problems: ProblemList) -> None:
    """FSDP places the frozen weights itself: not with another placement, nor quantized storage."""
    if training.distributed_strategy != "fsdp":
        return
    if training.musubi_blocks_to_swap or training.enable_group_offload:
        key = "musubi_blocks_to_swap" if training.musubi_blocks_to_swap else "enable_group_offload"
        problems.add(file, key, getattr(training, key),
                     "block swap and group offload move the frozen weights that fsdp shards over the GPUs",
                     f'set "{key}" to {0 if key == "musubi_blocks_to_swap" else "false"}, or '
                     '"distributed_strategy": "ddp"')
    if training.base_model_precision not in ("bf16", "no_change"):
        problems.add(file, "base_model_precision", training.base_model_precision,
                     "fsdp shards plain bf16 weights; quantized ones are not shardable tensors",
                     'use "base_model_precision": "bf16" with fsdp, or "distributed_strategy": "ddp"')
    if training.validation_step_cache:
        # every process renders together under fsdp; each would decide on its own which steps skip
        # the later blocks, and a step one skips and another runs leaves their weight gathers unmatched
        problems.add(file, "validation_step_cache", training.validation_step_cache,
                     "with fsdp every process renders each validation together, and the step cache's "
                     "skip decisions are not shared between them",
                     'set "validation_step_cache": 0 with fsdp (use it with `longcat validate` afterwards), '
                     'or "distributed_strategy": "ddp"')


def _check_kept_projections(training: TrainingConfig, file: Path, problems: ProblemList) -> None:
    kept = training.keep_projections
    if not kept:
        return
    if not (training.gradient_checkpointing and training.gradient_checkpointing_mode == "selective"):
        problems.add(file, "keep_projections", kept,
                     "projections are kept by selective checkpointing, which this config does not use",
                     'set "gradient_checkpointing": true and "gradient_checkpointing_mode": "selective", '
                     "or remove keep_projections")
    elif training.base_model_precision != "bf16":
        problems.add(file, "keep_projections", kept,
                     f"{training.base_model_precision} weights run PEFT's own LoRA forward, which keeps no projection",
                     'use "base_model_precision": "bf16" for the speed, or remove keep_projections to save the host RAM',
                     severity="warning")
    untargeted = [r for r in kept if PROJECTION_MODULES[r] not in training.lora_target_modules]
    if untargeted:
        problems.add(file, "keep_projections", kept,
                     f"{untargeted} name linears without a LoRA ({[PROJECTION_MODULES[r] for r in untargeted]}), "
                     "and only LoRA linears can be kept",
                     "add those modules to lora_target_modules or remove them from keep_projections", severity="warning")


def check_datasets(
    entries: list[BackendEntry], training: TrainingConfig, config_file: Path, backend_file: Path, problems: ProblemList
) -> None:
    by_id: dict[str, BackendEntry] = {}
    for entry in entries:
        if entry.raw_id is None:
            continue
        if entry.raw_id in by_id:
            problems.add(
                backend_file,
                f"{entry.key}.id",
                entry.raw_id,
                f"duplicate id: {by_id[entry.raw_id].key} already uses it",
                "give every dataset its own id",
            )
        else:
            by_id[entry.raw_id] = entry

    for entry in entries:
        dataset = entry.dataset
        if dataset is None or dataset.disabled:
            continue
        _check_conditioning_refs(entry, dataset, by_id, backend_file, problems)
        _check_dataset(entry, dataset, training, backend_file, problems)

    _check_eval_split(training, by_id, config_file, problems)
    _check_shared_caches(entries, backend_file, problems)
    _check_text_embeds(entries, backend_file, problems)

    trainable = [
        e
        for e in entries
        if not e.disabled and kind_of(e.raw_type).trained and e.raw_id != training.eval_dataset_id
    ]
    if not trainable:
        problems.add(
            backend_file,
            "datasets",
            [e.raw_id for e in entries],
            "no enabled video or image dataset is left to train on (conditioning data and the eval split are not trained on)",
            'add an entry with "dataset_type": "video"',
        )
    elif all(e.dataset is not None and e.dataset.probability == 0 for e in trainable):
        problems.add(
            backend_file,
            f"{trainable[0].key}.probability",
            0,
            f"every training dataset ({', '.join(str(e.raw_id) for e in trainable)}) has probability 0: no batch can be drawn",
            "give at least one of them a positive probability (1 is the default)",
        )


def _check_conditioning_refs(
    entry: BackendEntry, dataset: DatasetConfig, by_id: dict[str, BackendEntry], file: Path, problems: ProblemList
) -> None:
    key = f"{entry.key}.conditioning_data"
    for ref in dataset.conditioning_data:
        target = by_id.get(ref)
        if target is None:
            problems.add(
                file, key, ref, f"names dataset id {ref!r}, which does not exist",
                f"use one of the start-frame datasets' ids ({_ids_of(by_id, 'gives_start_frames')}) or add one with that id",
            )
        elif not kind_of(target.raw_type).gives_start_frames:
            problems.add(
                file, key, ref, f"{ref!r} is a {target.raw_type!r} dataset, not start frames",
                f'set "dataset_type": {names_where("gives_start_frames")} on {ref!r}, or name such a dataset',
            )
        elif target.disabled:
            problems.add(file, key, ref, f"{ref!r} is disabled", f'remove "disabled": true from {ref!r}')
    if dataset.is_i2v and not dataset.kind.takes_start_frames:
        problems.add(
            file, f"{entry.key}.is_i2v", True,
            f"is_i2v applies to {names_where('takes_start_frames')} datasets, this one is {dataset.dataset_type!r}",
            'remove is_i2v here (start-frame images belong in a "conditioning" dataset)',
        )
    uses_start_frames = dataset.kind.takes_start_frames and (dataset.i2v_probability or 0.0) > 0.0
    if uses_start_frames and not dataset.conditioning_data:
        if dataset.strict_pairing:
            problems.add(
                file, key, [],
                "is_i2v with strict_pairing needs start frames, but no conditioning_data is given and no fallback is allowed",
                'add "conditioning_data": ["<start-frame dataset id>"], or set strict_pairing to false '
                "to use each clip's own first frame",
            )
        else:
            problems.add(
                file, key, [],
                "image-to-video without conditioning_data: each clip's own first frame is its start frame",
                "fine for clips that start on the intended frame; add a conditioning dataset to use separate start images",
                severity="warning",
            )
    if dataset.conditioning_data and not uses_start_frames and dataset.kind.takes_start_frames:
        problems.add(
            file, key, dataset.conditioning_data,
            "start frames are given but never used: i2v_probability is 0",
            'set "is_i2v": true (or i2v_probability > 0), or drop conditioning_data',
            severity="warning",
        )


def _check_dataset(
    entry: BackendEntry, dataset: DatasetConfig, training: TrainingConfig, file: Path, problems: ProblemList
) -> None:
    if dataset.caption_strategy == "instanceprompt" and not dataset.instance_prompt:
        problems.add(
            file, f"{entry.key}.instance_prompt", dataset.instance_prompt,
            'caption_strategy "instanceprompt" needs instance_prompt',
            'add "instance_prompt": "<the caption for every clip>", or use caption_strategy "textfile"',
        )
    if dataset.caption_strategy is None and dataset.kind.trained:
        problems.add(
            file, f"{entry.key}.caption_strategy", None,
            "a training dataset without captions trains every sample on the empty prompt",
            'use "textfile" (a .txt per clip), "filename", or "instanceprompt"',
            severity="warning",
        )
    _check_resolution(entry, dataset, training.aspect_bucket_alignment, file, problems)
    video = dataset.video
    if video.min_frames is not None and video.min_frames > video.num_frames:
        problems.add(
            file, f"{entry.key}.video.min_frames", video.min_frames,
            f"min_frames is above num_frames ({video.num_frames}): every clip would be skipped",
            f"use min_frames at most {video.num_frames}, or drop it",
        )
    if video.max_frames is not None and video.max_frames < video.num_frames:
        problems.add(
            file, f"{entry.key}.video.max_frames", video.max_frames,
            f"max_frames is below num_frames ({video.num_frames}): no clip could fill a window",
            f"use max_frames at least {video.num_frames}, or drop it",
        )


def _check_resolution(
    entry: BackendEntry, dataset: DatasetConfig, alignment: int, file: Path, problems: ProblemList
) -> None:
    key, value = f"{entry.key}.resolution", dataset.resolution
    if dataset.resolution_type == "area":
        if value > 16:
            problems.add(
                file, key, value, "with resolution_type \"area\" the resolution is in megapixels; this is far too large",
                'write megapixels (0.4 is about 480x832), or use resolution_type "pixel"',
            )
        return
    if value != int(value):
        problems.add(
            file, key, value, f'with resolution_type "{dataset.resolution_type}" the resolution is whole pixels',
            f"use a whole number such as {int(value) // PIXEL_MULTIPLE * PIXEL_MULTIPLE}",
        )
        return
    if dataset.resolution_type != "pixel":
        return
    pixels = int(value)
    low, high = pixels // alignment * alignment, (pixels // alignment + 1) * alignment
    if pixels % PIXEL_MULTIPLE != 0:
        problems.add(
            file, key, value,
            f"the short edge {pixels} is not a multiple of 16, so no frame can keep it (VAE stride 8 x 2x2 patches)",
            f"use {low} or {high} (multiples of aspect_bucket_alignment {alignment})",
        )
    elif pixels % alignment != 0:
        # A warning, not an error: the guides pair resolution 480 with alignment 64 and buckets
        # then round the short edge; the user should know it will not stay at 480.
        problems.add(
            file, key, value,
            f"{pixels} is not a multiple of aspect_bucket_alignment {alignment}: buckets round the short edge to {low} or {high}",
            f"set aspect_bucket_alignment to {_alignment_for(pixels)} in config.json to keep {pixels} exactly, "
            f"or use resolution {low} or {high}",
            severity="warning",
        )


def _alignment_for(pixels: int) -> int:
    return 32 if pixels % 32 == 0 else 16


def _check_eval_split(training: TrainingConfig, by_id: dict[str, BackendEntry], file: Path, problems: ProblemList) -> None:
    eval_id = training.eval_dataset_id
    if eval_id is None:
        return
    target = by_id.get(eval_id)
    if target is None:
        problems.add(
            file, "eval_dataset_id", eval_id, f"no dataset in multidatabackend.json has the id {eval_id!r}",
            f"add a small held-out split with that id (same structure as the training clips), or use one of: {_ids_of(by_id, 'trained')}",
        )
    elif not kind_of(target.raw_type).trained:
        problems.add(
            file, "eval_dataset_id", eval_id, f"{eval_id!r} is a {target.raw_type!r} dataset, not clips to validate on",
            "name a video dataset (its start frames come through its own conditioning_data)",
        )
    elif target.disabled:
        problems.add(file, "eval_dataset_id", eval_id, f"{eval_id!r} is disabled", f'remove "disabled": true from {eval_id!r}')


def _check_shared_caches(entries: list[BackendEntry], file: Path, problems: ProblemList) -> None:
    # Clips and start frames must not share a latent cache directory (the guides say so too):
    # their cache files would be indistinguishable to a person cleaning up.
    seen: dict[Path, BackendEntry] = {}
    for entry in entries:
        dataset = entry.dataset
        if dataset is None or dataset.cache_dir_vae is None or dataset.disabled:
            continue
        other = seen.setdefault(dataset.cache_dir_vae, entry)
        if other is not entry:
            problems.add(
                file, f"{entry.key}.cache_dir_vae", str(dataset.cache_dir_vae),
                f"the same latent cache directory as {other.key} ({other.raw_id!r})",
                "give each dataset its own cache_dir_vae (or leave it null for a per-dataset default)",
            )


def _check_text_embeds(entries: list[BackendEntry], file: Path, problems: ProblemList) -> None:
    defaults = [e for e in entries if isinstance(e.model, TextEmbedsConfig) and e.model.default and not e.model.disabled]
    for extra in defaults[1:]:
        problems.add(
            file, f"{extra.key}.default", True, f"a second default text_embeds entry ({defaults[0].key} is default too)",
            "keep one text_embeds entry with default true",
        )


def _ids_of(by_id: dict[str, BackendEntry], question: str) -> str:
    """The ids of the datasets whose type answers `question` (a `DatasetKind` field) with true."""
    ids = [i for i, e in by_id.items() if getattr(kind_of(e.raw_type), question)]
    return ", ".join(repr(i) for i in ids) if ids else "none defined"


def check_paths(
    training: TrainingConfig, checkpoint_from_default: bool | None, entries: list[BackendEntry], config_file: Path,
    backend_file: Path, problems: ProblemList,
) -> None:
    """Filesystem checks: the checkpoint (unless `checkpoint_from_default` is None),
    `resume_from_checkpoint`, `validation_continuation_video` (decoded), every dataset directory."""
    if checkpoint_from_default is not None and training.pretrained_model_name_or_path is not None:
        check_checkpoint_dir(
            training.pretrained_model_name_or_path, "pretrained_model_name_or_path", config_file,
            checkpoint_from_default, problems,
        )
    resume = training.resume_from_checkpoint
    if resume is not None and resume != "latest" and not Path(resume).is_dir():
        problems.add(
            config_file, "resume_from_checkpoint", resume, "checkpoint directory does not exist",
            f'use "latest" to continue from the newest checkpoint in {training.output_dir}, a path that exists, or null',
        )
    video = training.validation_continuation_video
    if video is not None:
        check_continuation_video(video, training.validation_continuation_cond_frames, config_file, problems)
    for entry in entries:
        dataset = entry.dataset
        if dataset is None or dataset.disabled:
            continue
        directory = dataset.instance_data_dir
        if not directory.is_dir():
            rule = "is a file, not a directory" if directory.exists() else "directory does not exist"
            problems.add(
                backend_file, f"{entry.key}.instance_data_dir", str(directory), rule,
                "point it at this dataset's folder (relative paths start at multidatabackend.json's folder)",
            )
