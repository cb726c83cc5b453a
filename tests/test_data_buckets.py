"""Aspect buckets, placement (resize to cover + crop) and the resolution_frames rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from longcat_train.data.buckets import AspectBuckets, Bucket, frames_for, place
from longcat_train.data.spec import DataSpec


@pytest.mark.parametrize("alignment", [16, 32, 64])
@pytest.mark.parametrize("source", [(480, 832), (1080, 1920), (1920, 1080), (720, 720), (47, 63), (333, 1000)])
def test_sides_are_multiples_of_alignment(alignment: int, source: tuple[int, int]) -> None:
    for resolution_type, resolution in (("pixel", 480), ("area", 0.4), ("pixel_area", 640)):
        height, width = AspectBuckets(resolution, resolution_type, alignment).target_size(*source)
        assert height % alignment == 0 and width % alignment == 0
        assert height >= alignment and width >= alignment


def test_480x832_needs_alignment_32() -> None:
    assert AspectBuckets(480, "pixel", 32).target_size(480, 832) == (480, 832)
    assert AspectBuckets(480, "pixel", 16).target_size(480, 832) == (480, 832)
    assert AspectBuckets(480, "pixel", 64).target_size(480, 832) != (480, 832)
    assert AspectBuckets(480, "pixel", 32).target_size(832, 480) == (832, 480)  # portrait


def test_pixel_keeps_shorter_side_and_aspect() -> None:
    buckets = AspectBuckets(480, "pixel", 32)
    assert buckets.target_size(1080, 1920) == (480, 864)  # 480 * 16/9 = 853.3 -> 864
    assert buckets.target_size(1920, 1080) == (864, 480)
    assert buckets.target_size(100, 100) == (480, 480)


def test_area_types_target_the_same_pixel_count() -> None:
    # `area` counts megapixels (1e6 px); `pixel_area` counts resolution² pixels.
    h, w = AspectBuckets(0.25, "area", 16).target_size(900, 1600)
    assert abs(h * w - 250_000) / 250_000 < 0.05 and abs(w / h - 16 / 9) < 0.05
    h, w = AspectBuckets(512, "pixel_area", 16).target_size(900, 1600)
    assert abs(h * w - 512 * 512) / (512 * 512) < 0.05 and abs(w / h - 16 / 9) < 0.05


def test_square_crop_aspect() -> None:
    assert AspectBuckets(256, "pixel", 64, crop_aspect="square").target_size(1080, 1920) == (256, 256)


def test_bad_alignment_rejected() -> None:
    with pytest.raises(ValueError, match="alignment 48"):
        AspectBuckets(480, "pixel", 48)


def test_placement_covers_and_crops() -> None:
    bucket = Bucket(64, 128, 5)
    centre = place((100, 150), bucket, True, "center", 0.0)
    assert centre.resize == (85, 128)  # scale max(64/100, 128/150) = 0.853
    assert centre.crop == (10, 0, 64, 128)
    assert place((100, 150), bucket, True, "corner", 0.0).crop == (0, 0, 64, 128)
    randoms = {place((100, 150), bucket, True, "random", r / 10).crop[0] for r in range(10)}
    assert randoms <= set(range(22)) and len(randoms) > 3
    stretch = place((100, 150), bucket, False, "center", 0.0)
    assert stretch.resize == (64, 128) and stretch.crop == (0, 0, 64, 128)


def _spec(**kwargs) -> DataSpec:
    return DataSpec(id="d", instance_data_dir=Path("."), **kwargs)


def test_aspect_ratio_strategy_uses_num_frames() -> None:
    spec = _spec(num_frames=13)
    assert frames_for(13, spec) == 13
    assert frames_for(40, spec) == 13
    assert frames_for(12, spec) is None
    assert frames_for(40, _spec(num_frames=13, max_frames=30)) is None  # too long: skipped


def test_resolution_frames_picks_longest_valid_count() -> None:
    spec = _spec(bucket_strategy="resolution_frames", frame_interval=8, num_frames=33, min_frames=9, max_frames=80)
    assert frames_for(30, spec) == 25  # 1 + 8k <= 30
    assert frames_for(25, spec) == 25
    assert frames_for(60, spec) == 33  # capped by num_frames
    assert frames_for(8, spec) is None  # below min_frames
    assert frames_for(81, spec) is None  # above max_frames
    default_min = _spec(bucket_strategy="resolution_frames")  # min 1 + frame_interval = 5
    assert frames_for(7, default_min) == 5 and frames_for(4, default_min) is None


def test_image_datasets_are_single_frames() -> None:
    assert frames_for(1, _spec(dataset_type="image")) == 1


def test_bucket_label() -> None:
    assert Bucket(480, 832, 93).label == "480x832x93"


def test_spec_validation_names_the_problem() -> None:
    with pytest.raises(ValueError, match="num_frames 92"):
        _spec(num_frames=92)
    with pytest.raises(ValueError, match="frame_interval 6"):
        _spec(frame_interval=6)
    with pytest.raises(ValueError, match="instance_prompt"):
        _spec(caption_strategy="instanceprompt")
