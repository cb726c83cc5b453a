"""Dataset entries of `multidatabackend.json`, with the keys the LongCat-Video guides use."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from longcat_train.config.dataset_types import DATASET_TYPES, DatasetKind, DatasetType
from longcat_train.config.rules import Flag, check_frame_interval, check_frames, check_name, check_path_text

DEFAULT_FPS = 15.0  # LongCat-Video is trained and sampled at 15 fps (not 30, as one guide says).
DEFAULT_CAPTION_DROPOUT = 0.05

CaptionStrategy = Literal["textfile", "filename", "instanceprompt"]
ResolutionType = Literal["pixel", "area", "pixel_area"]
BucketStrategy = Literal["aspect_ratio", "resolution_frames"]
CropStyle = Literal["center", "random", "corner"]
CropAspect = Literal["preserve", "square"]
FrameWindow = Literal["start", "middle", "random", "uniform"]

Frames = Annotated[int, AfterValidator(check_frames)]
FrameInterval = Annotated[int, AfterValidator(check_frame_interval)]


class VideoOptions(BaseModel):
    """The `video` section of a dataset entry."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    num_frames: Frames = Field(93, description="Frames per training clip; (frames - 1) % 4 == 0.")
    min_frames: Frames | None = Field(
        None, description="Skip clips with fewer frames (after fps resampling); null: `num_frames`."
    )
    max_frames: Frames | None = Field(None, description="Skip clips with more frames; null: no limit.")
    bucket_strategy: BucketStrategy = Field(
        "aspect_ratio",
        description="`aspect_ratio`: buckets by aspect, every clip `num_frames` long. "
        "`resolution_frames`: buckets `HxWxF` for mixed lengths, F rounded to `frame_interval`.",
    )
    frame_interval: FrameInterval = Field(
        4, description="Frame-count rounding of `resolution_frames` buckets; a multiple of 4."
    )
    is_i2v: Flag | None = Field(None, description="Same as the entry's top-level `is_i2v` (either place works).")


class DatasetConfig(BaseModel):
    """One `video`, `image` or `conditioning` (start-frame) dataset of `multidatabackend.json`."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    id: Annotated[str, AfterValidator(check_name)] = Field(
        min_length=1, description="Unique name, referenced by `conditioning_data` and `eval_dataset_id`; a "
        "plain name (it names the dataset's cache folder), not a path.")
    type: Literal["local"] = Field("local", description="Storage backend; local directories only.")
    dataset_type: DatasetType = Field(
        "video",
        description="`video` clips, `image` stills (one-frame clips), or `conditioning`: start frames "
        "for an `is_i2v` dataset, matched to its clips by file stem.",
    )
    disabled: Flag = Field(False, description="Ignore this entry.")
    instance_data_dir: Annotated[Path, BeforeValidator(check_path_text)] = Field(
        description="Directory of the media (relative paths: relative to multidatabackend.json)."
    )
    is_i2v: Flag | None = Field(
        None, description="Image-to-video: train with the clip's start frame as a clean first latent."
    )
    i2v_probability: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Share of samples trained image-to-video (the rest text-to-video); null: 1.0 for "
        "`is_i2v` datasets, 0.0 otherwise.",
    )
    conditioning_data: list[str] = Field(
        [], description="Id(s) of the `conditioning` dataset(s) holding this dataset's start frames."
    )
    strict_pairing: Flag = Field(
        False,
        description="Every clip must have a start frame in `conditioning_data`; when false a clip "
        "without one uses its own first frame (reported).",
    )
    caption_strategy: CaptionStrategy | None = Field(
        "textfile",
        description="`textfile` (same stem .txt), `filename` (the file name), `instanceprompt` "
        "(`instance_prompt` for all), null (no captions: conditioning data).",
    )
    instance_prompt: str | None = Field(None, description="The caption of every item with `instanceprompt`.")
    allow_links_outside: Flag = Field(
        False,
        description="Use files, caption files and folders that are symbolic links to places outside "
        "`instance_data_dir`; when false they are skipped and listed with the reason (a link can pull any "
        "file on the machine into training and into the caches).",
    )
    allow_missing_captions: Flag = Field(
        False,
        description="Train a dataset in which no usable clip has a caption (every one missing or empty), "
        "all of them as unconditional samples; when false such a dataset is refused (its clips skipped, "
        "`data check` exits 1), as it usually means captions are elsewhere or `caption_strategy` is wrong.",
    )
    caption_dropout_probability: float = Field(
        DEFAULT_CAPTION_DROPOUT,
        ge=0.0,
        le=1.0,
        description="Share of samples trained with the empty prompt, so CFG has an unconditional "
        "branch to push against; small enough not to weaken prompt following.",
    )
    resolution: int | float = Field(
        480, gt=0, le=16384, description="Target size; its unit follows `resolution_type`."
    )
    resolution_type: ResolutionType = Field(
        "pixel",
        description="`pixel`: shorter edge in pixels; `area`: megapixels; `pixel_area`: the area of a "
        "`resolution`x`resolution` square, any aspect.",
    )
    crop: Flag = Field(True, description="Crop to the bucket's aspect after resizing (otherwise squash).")
    crop_style: CropStyle = Field("center", description="Where the crop is taken.")
    crop_aspect: CropAspect = Field(
        "preserve", description="`preserve`: aspect buckets; `square`: everything square."
    )
    max_upscale: float = Field(
        2.0, ge=1.0, description="Skip sources that would need more than this enlargement to fill their bucket."
    )
    fps: float | Literal["source"] = Field(
        DEFAULT_FPS, description='Frame rate clips are resampled to before windowing; "source" keeps every frame.'
    )
    frame_window: FrameWindow = Field(
        "start",
        description="Which `num_frames` of a longer clip: from the start, the middle, a random "
        "(seeded) start, or evenly spaced windows.",
    )
    video: VideoOptions = Field(VideoOptions(), description="Frame settings (see the table below).")
    cache_dir_vae: Annotated[Path | None, BeforeValidator(check_path_text)] = Field(
        None, description="Latent cache directory; null: `<output_dir>/cache/vae/<id>`. One per dataset."
    )
    repeats: int = Field(0, ge=0, le=10_000, description="Extra passes over this dataset per epoch.")
    probability: float = Field(1.0, ge=0.0, le=1e6, description="Relative chance of drawing a batch from this dataset.")

    @field_validator("conditioning_data", mode="before")
    @classmethod
    def _one_id_is_a_list(cls, value: object) -> object:
        # SimpleTuner accepts a single id as a string.
        return [value] if isinstance(value, str) else value

    @field_validator("fps")
    @classmethod
    def _positive_fps(cls, value: float | str) -> float | str:
        if value != "source" and value <= 0:
            raise PydanticCustomError(
                "fps", "fps must be positive or \"source\"", {"fix": 'use 15 (the model\'s rate) or "source"'}
            )
        return value

    @model_validator(mode="after")
    def _resolve_i2v(self) -> DatasetConfig:
        # `is_i2v` may sit at the top level (as the guides write it) or under `video`; resolved
        # here so consumers read one attribute, and `i2v_probability` gets its default from it.
        is_i2v = bool(self.is_i2v if self.is_i2v is not None else self.video.is_i2v)
        object.__setattr__(self, "is_i2v", is_i2v)
        if self.i2v_probability is None:
            object.__setattr__(self, "i2v_probability", 1.0 if is_i2v else 0.0)
        return self

    @property
    def kind(self) -> DatasetKind:
        """What this dataset's type is (`config/dataset_types.py`)."""
        return DATASET_TYPES[self.dataset_type]

    @property
    def num_frames(self) -> int:
        return self.video.num_frames


class TextEmbedsConfig(BaseModel):
    """A SimpleTuner `text_embeds` entry: where umT5 caption embeddings are cached."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Annotated[str, AfterValidator(check_name)] = Field(min_length=1, description="Name of the text-embedding cache.")
    type: Literal["local"] = Field("local", description="Storage backend; local directories only.")
    dataset_type: Literal["text_embeds"] = Field(description="Marks this entry as the text-embedding cache.")
    default: Flag = Field(False, description="Use this cache for every dataset (only one may be default).")
    cache_dir: Annotated[Path, BeforeValidator(check_path_text)] = Field(description="Directory of the cached umT5 embeddings.")
    disabled: Flag = Field(False, description="Ignore this entry.")
