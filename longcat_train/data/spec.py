"""The dataset settings the data pipeline needs, as one frozen value.

`DataSpec` is a `DatasetConfig` entry flattened (its `video` section merged, the training config's
bucket alignment added) into a plain dataclass the data pipeline can also be driven with directly
(tests, `data check`). Its value sets, defaults and checks are the config's own, read from the
config models and rules, so the two cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from pydantic_core import PydanticCustomError

from longcat_train.config.dataset_types import DATASET_TYPES, DatasetKind
from longcat_train.config.datasets import (
    BucketStrategy,
    CaptionStrategy,
    CropAspect,
    CropStyle,
    DatasetConfig,
    DatasetType,
    FrameWindow,
    ResolutionType,
    VideoOptions,
)
from longcat_train.config.rules import check_alignment, check_frame_interval, check_frames
from longcat_train.config.training import TrainingConfig

VIDEO_KEYS = ("num_frames", "min_frames", "max_frames", "bucket_strategy", "frame_interval")


def _default(name: str) -> Any:
    """The config's default of a dataset key (`video` section keys included)."""
    model = VideoOptions if name in VIDEO_KEYS else DatasetConfig
    return model.model_fields[name].default


@dataclass(frozen=True)
class DataSpec:
    """One dataset entry (a multidatabackend item) as the data pipeline sees it.

    `fps` is a target frame rate or the string "source" (keep every decoded frame).
    `repeats` follows SimpleTuner: every item appears `1 + repeats` times per epoch.
    `min_frames` / `max_frames` skip clips with fewer / more frames after fps resampling;
    `min_frames` defaults to `num_frames` (`aspect_ratio`) or 1 + `frame_interval`
    (`resolution_frames`, whose point is mixed lengths).
    `max_upscale` bounds how much a source may be enlarged to reach its bucket: smaller sources
    are skipped as "tiny" rather than trained on as blurry upscales.
    """

    id: str
    instance_data_dir: Path
    dataset_type: DatasetType = _default("dataset_type")
    is_i2v: bool = False  # the config resolves its null to False
    caption_strategy: CaptionStrategy | None = _default("caption_strategy")
    instance_prompt: str | None = None
    allow_missing_captions: bool = _default("allow_missing_captions")
    allow_links_outside: bool = _default("allow_links_outside")
    resolution: float = _default("resolution")
    resolution_type: ResolutionType = _default("resolution_type")
    alignment: int = TrainingConfig.model_fields["aspect_bucket_alignment"].default
    conditioning_data: tuple[str, ...] = ()
    num_frames: int = _default("num_frames")
    min_frames: int | None = None
    max_frames: int | None = None
    bucket_strategy: BucketStrategy = _default("bucket_strategy")
    frame_interval: int = _default("frame_interval")
    fps: float | Literal["source"] = _default("fps")
    frame_window: FrameWindow = _default("frame_window")
    repeats: int = _default("repeats")
    probability: float = _default("probability")
    crop: bool = _default("crop")
    crop_style: CropStyle = _default("crop_style")
    crop_aspect: CropAspect = _default("crop_aspect")
    disabled: bool = _default("disabled")
    i2v_probability: float = 1.0  # the config's resolved default for an `is_i2v` dataset
    caption_dropout_probability: float = _default("caption_dropout_probability")
    strict_pairing: bool = _default("strict_pairing")
    max_upscale: float = _default("max_upscale")

    def __post_init__(self) -> None:
        # the config's rules, for specs built without a config (tests, `data check` on a hand-built spec)
        problems: list[str] = []
        for name, rule in (("alignment", check_alignment), ("num_frames", check_frames),
                           ("frame_interval", check_frame_interval)):
            try:
                rule(getattr(self, name))
            except PydanticCustomError as error:
                fix = (error.context or {}).get("fix")
                problems.append(f"{name} {getattr(self, name)}: {error.message()}" + (f" ({fix})" if fix else ""))
        for name in ("min_frames", "max_frames"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} {value} must be at least 1")
        if self.caption_strategy == "instanceprompt" and not self.instance_prompt:
            problems.append("caption_strategy 'instanceprompt' needs instance_prompt")
        if problems:
            raise ValueError(f"dataset '{self.id}': " + "; ".join(problems))

    @property
    def kind(self) -> DatasetKind:
        """What this dataset's type is (`config/dataset_types.py`)."""
        return DATASET_TYPES[self.dataset_type]

    @property
    def effective_min_frames(self) -> int:
        if self.min_frames is not None:
            return self.min_frames
        return self.num_frames if self.bucket_strategy == "aspect_ratio" else 1 + self.frame_interval

    @classmethod
    def from_dataset_config(cls, cfg: DatasetConfig, alignment: int) -> DataSpec:
        """The entry `cfg` (validated and defaulted by the config) with the training config's
        `aspect_bucket_alignment`."""
        values = {f.name: getattr(cfg.video if f.name in VIDEO_KEYS else cfg, f.name)
                  for f in fields(cls) if f.name != "alignment"}
        values["conditioning_data"] = tuple(values["conditioning_data"])
        values["resolution"] = float(values["resolution"])  # as cache fingerprints have always held it
        return cls(**values, alignment=alignment)
