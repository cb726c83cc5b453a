"""The dataset settings the data pipeline needs, as one frozen value.

The pipeline works over `DataSpec` instead of the pydantic `DatasetConfig` so that decoding,
bucketing and scanning can be used (and tested) without the config layer; `from_dataset_config`
reads the config's attribute names, so any object with those attributes works.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from longcat_train.release_facts import is_valid_frame_count, nearest_valid_frame_counts

DatasetType = Literal["video", "image", "conditioning"]
CaptionStrategy = Literal["textfile", "filename", "instanceprompt"]
ResolutionType = Literal["pixel", "area", "pixel_area"]
BucketStrategy = Literal["aspect_ratio", "resolution_frames"]
CropStyle = Literal["center", "random", "corner"]
CropAspect = Literal["preserve", "square"]
FrameWindow = Literal["start", "middle", "random", "uniform"]

DEFAULT_NUM_FRAMES = 93
DEFAULT_FPS = 15.0
DEFAULT_ALIGNMENT = 64


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
    dataset_type: DatasetType = "video"
    is_i2v: bool = False
    caption_strategy: CaptionStrategy | None = "textfile"
    instance_prompt: str | None = None
    resolution: float = 480
    resolution_type: ResolutionType = "pixel"
    alignment: int = DEFAULT_ALIGNMENT
    conditioning_data: tuple[str, ...] = ()
    num_frames: int = DEFAULT_NUM_FRAMES
    min_frames: int | None = None
    max_frames: int | None = None
    bucket_strategy: BucketStrategy = "aspect_ratio"
    frame_interval: int = 4
    fps: float | Literal["source"] = DEFAULT_FPS
    frame_window: FrameWindow = "start"
    repeats: int = 0
    probability: float = 1.0
    crop: bool = True
    crop_style: CropStyle = "center"
    crop_aspect: CropAspect = "preserve"
    disabled: bool = False
    i2v_probability: float = 1.0
    caption_dropout_probability: float = 0.0
    strict_pairing: bool = False
    max_upscale: float = 2.0

    def __post_init__(self) -> None:
        # The config layer validates these too; repeating the cheap checks here keeps the data
        # pipeline safe when it is driven directly (tests, `data check` on a hand-built spec).
        problems: list[str] = []
        if self.alignment not in (16, 32, 64):
            problems.append(f"alignment {self.alignment} must be 16, 32 or 64")
        if not is_valid_frame_count(self.num_frames):
            below, above = nearest_valid_frame_counts(max(self.num_frames, 1))
            problems.append(
                f"num_frames {self.num_frames} must satisfy (n - 1) % 4 == 0 (nearest valid: {below} or {above})"
            )
        for name in ("min_frames", "max_frames"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} {value} must be at least 1")
        if self.frame_interval < 4 or self.frame_interval % 4 != 0:
            problems.append(f"frame_interval {self.frame_interval} must be a positive multiple of 4")
        if self.caption_strategy == "instanceprompt" and not self.instance_prompt:
            problems.append("caption_strategy 'instanceprompt' needs instance_prompt")
        if self.fps != "source" and not (isinstance(self.fps, (int, float)) and self.fps > 0):
            problems.append(f"fps {self.fps!r} must be a positive number or 'source'")
        if self.resolution <= 0:
            problems.append(f"resolution {self.resolution} must be positive")
        if problems:
            raise ValueError(f"dataset '{self.id}': " + "; ".join(problems))

    @property
    def is_video(self) -> bool:
        return self.dataset_type == "video"

    @property
    def effective_min_frames(self) -> int:
        if self.min_frames is not None:
            return self.min_frames
        return self.num_frames if self.bucket_strategy == "aspect_ratio" else 1 + self.frame_interval

    @classmethod
    def from_dataset_config(cls, cfg: Any, alignment: int | None = None) -> DataSpec:
        """Build from a `DatasetConfig` (or anything with its attribute names).

        `alignment` comes from the training config (`aspect_bucket_alignment`) when the dataset
        entry does not carry its own.
        """
        video = getattr(cfg, "video", None)

        def from_video(name: str, default: Any) -> Any:
            value = getattr(video, name, None) if video is not None else None
            return default if value is None else value

        def field(name: str, default: Any) -> Any:
            value = getattr(cfg, name, None)
            return default if value is None else value

        caption_strategy = getattr(cfg, "caption_strategy", "textfile")
        fps = field("fps", DEFAULT_FPS)
        return cls(
            id=str(cfg.id),
            instance_data_dir=Path(cfg.instance_data_dir),
            dataset_type=field("dataset_type", "video"),
            is_i2v=bool(field("is_i2v", False)),
            caption_strategy=caption_strategy,
            instance_prompt=getattr(cfg, "instance_prompt", None),
            resolution=float(field("resolution", 480)),
            resolution_type=field("resolution_type", "pixel"),
            alignment=int(
                field("aspect_bucket_alignment", alignment if alignment is not None else DEFAULT_ALIGNMENT)
            ),
            conditioning_data=tuple(field("conditioning_data", ())),
            num_frames=int(from_video("num_frames", DEFAULT_NUM_FRAMES)),
            min_frames=from_video("min_frames", None),
            max_frames=from_video("max_frames", None),
            bucket_strategy=from_video("bucket_strategy", "aspect_ratio"),
            frame_interval=int(from_video("frame_interval", 4)),
            fps=fps if fps == "source" else float(fps),
            frame_window=field("frame_window", "start"),
            repeats=int(field("repeats", 0)),
            probability=float(field("probability", 1.0)),
            crop=bool(field("crop", True)),
            crop_style=field("crop_style", "center"),
            crop_aspect=field("crop_aspect", "preserve"),
            disabled=bool(field("disabled", False)),
            i2v_probability=float(field("i2v_probability", 1.0)),
            caption_dropout_probability=float(field("caption_dropout_probability", 0.0)),
            strict_pairing=bool(field("strict_pairing", False)),
            max_upscale=float(field("max_upscale", 2.0)),
        )
