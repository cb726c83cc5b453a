"""Aspect and frame buckets: the (height, width, frames) each clip is trained at.

Every batch holds one bucket, so clips of different shapes never need padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from longcat_train.config.datasets import CropAspect, CropStyle, ResolutionType
from longcat_train.data.spec import DataSpec

# Sources beyond this aspect ratio would be cropped to a sliver of their content.
MAX_ASPECT_RATIO = 4.0


@dataclass(frozen=True, order=True)
class Bucket:
    height: int
    width: int
    num_frames: int

    @property
    def label(self) -> str:
        """`HxWxF` (height x width x frames): the one notation of buckets everywhere the CLI prints
        them, in the order of `--resolution HxW` and `validation_resolution`."""
        return f"{self.height}x{self.width}x{self.num_frames}"


@dataclass(frozen=True)
class Placement:
    """How one source (upright height x width) maps onto its bucket: resize, then crop."""

    resize: tuple[int, int]  # (height, width) after resizing
    crop: tuple[int, int, int, int]  # (top, left, height, width) in the resized image


class AspectBuckets:
    """Target sizes for sources of any shape.

    - `pixel`: the shorter side becomes about `resolution` pixels, aspect kept.
    - `area`: about `resolution` megapixels (1 MP = 1e6 pixels), aspect kept (SimpleTuner).
    - `pixel_area`: about `resolution`² pixels, aspect kept: `pixel_area` 480 gives 480x480's
      area in whatever shape the source has.

    Both sides are then rounded to multiples of `alignment`. LongCat-Video's latent grid needs
    multiples of 16 (VAE /8 then the 2x2 patch). 64 is the default because it gives few, well
    filled buckets; the model's native 480x832 needs 32, since 480 is not a multiple of 64
    (64 would turn it into 512x832 or 448x832).
    With `crop_aspect="square"` every source gets the square bucket of the same area.
    """

    def __init__(
        self, resolution: float, resolution_type: ResolutionType = "pixel", alignment: int = 64,
        crop_aspect: CropAspect = "preserve",
    ) -> None:
        if alignment not in (16, 32, 64):
            raise ValueError(f"alignment {alignment} must be 16, 32 or 64 (the latent grid needs multiples of 16)")
        if resolution_type not in ("pixel", "area", "pixel_area"):
            raise ValueError(f"resolution_type {resolution_type!r} must be pixel, area or pixel_area")
        self.resolution = resolution
        self.resolution_type = resolution_type
        self.alignment = alignment
        self.crop_aspect = crop_aspect

    def _align(self, size: float) -> int:
        return max(self.alignment, int(round(size / self.alignment)) * self.alignment)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of the bucket for an upright source of `height` x `width`."""
        if height <= 0 or width <= 0:
            raise ValueError(f"source size {width}x{height} must be positive")
        aspect = width / height
        if self.crop_aspect == "square":
            aspect = 1.0
        if self.resolution_type == "pixel":
            short = self.resolution  # the shorter side; the other follows the aspect
            target_h, target_w = (short, short * aspect) if aspect >= 1 else (short / aspect, short)
        else:
            area = self.resolution * 1e6 if self.resolution_type == "area" else self.resolution**2
            target_h = math.sqrt(area / aspect)
            target_w = target_h * aspect
        return self._align(target_h), self._align(target_w)


def place(source: tuple[int, int], bucket: Bucket, crop: bool, crop_style: CropStyle, rng_value: float) -> Placement:
    """Resize `source` (height, width) to cover the bucket, then crop it.

    `crop=False` resizes straight to the bucket (a slight stretch, since buckets keep aspect up
    to alignment rounding). `crop_style`: `center`, `corner` (top-left) or `random`, where
    `rng_value` in [0, 1) picks the offset (the caller seeds it per item).
    """
    src_h, src_w = source
    if not crop:
        return Placement(resize=(bucket.height, bucket.width), crop=(0, 0, bucket.height, bucket.width))
    scale = max(bucket.height / src_h, bucket.width / src_w)
    resized = (max(bucket.height, round(src_h * scale)), max(bucket.width, round(src_w * scale)))
    spare_h, spare_w = resized[0] - bucket.height, resized[1] - bucket.width
    if crop_style == "center":
        top, left = spare_h // 2, spare_w // 2
    elif crop_style == "corner":
        top, left = 0, 0
    elif crop_style == "random":
        top, left = int(rng_value * (spare_h + 1)), int(rng_value * (spare_w + 1))
    else:
        raise ValueError(f"unknown crop_style {crop_style!r}: use center, random or corner")
    return Placement(resize=resized, crop=(top, left, bucket.height, bucket.width))


def frames_for(available: int, spec: DataSpec) -> int | None:
    """Frames a clip with `available` resampled frames trains at, or None when it is skipped.

    Clips with fewer than `spec.effective_min_frames` or more than `max_frames` are skipped.
    `aspect_ratio`: always `num_frames`. `resolution_frames`: the longest count
    1 + k·frame_interval (valid, since the interval is a multiple of 4) that fits in both the
    clip and `num_frames`, so mixed lengths share a few `HxWxF` buckets.
    Image datasets are single frames.
    """
    if not spec.kind.moving:
        return 1
    if available < max(spec.effective_min_frames, 1):
        return None
    if spec.max_frames is not None and available > spec.max_frames:
        return None
    if spec.bucket_strategy == "aspect_ratio":
        return spec.num_frames if available >= spec.num_frames else None
    longest = min(available, spec.num_frames)
    return 1 + spec.frame_interval * ((longest - 1) // spec.frame_interval)
