"""Scanning dataset folders of real clips: items, skips with reasons, captions, pairing, pixels."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from longcat_train.data import (
    DatasetError,
    DataSpec,
    load_clip_pixels,
    load_start_frame_pixels,
    scan_dataset,
)
from longcat_train.config.datasets import DatasetConfig
from longcat_train.data.buckets import Bucket
from longcat_train.data.items import FileStamp

from .media_factory import (
    encode,
    marker_frames,
    read_index,
    write_clip,
    write_empty,
    write_garbage,
    write_image,
    write_rotated_clip,
    write_truncated_clip,
)


def _spec(directory: Path, **kwargs) -> DataSpec:
    defaults = dict(id="clips", instance_data_dir=directory, resolution=32, alignment=16, num_frames=9)
    return DataSpec(**{**defaults, **kwargs})


def _to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3]."""
    return ((pixels.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()


@pytest.fixture()
def messy_dataset(tmp_path: Path) -> Path:
    root = tmp_path / "clips"
    write_clip(root / "a.mp4", count=48, fps=24)
    (root / "a.txt").write_text("a red frame", encoding="utf-8")
    write_clip(root / "sub" / "b.mkv", count=30, fps=30, codec="mpeg4")  # no caption file
    write_clip(root / "c.mp4", count=20, fps=15)
    (root / "c.txt").write_text("   \n", encoding="utf-8")  # empty caption
    write_clip(root / "odd.mkv", count=12, fps=15, height=47, width=63, codec="ffv1", pix_fmt="yuv444p")
    (root / "odd.txt").write_text("odd sized", encoding="utf-8")
    write_rotated_clip(root / "rot.mp4", marker_frames(24, 48, 64), 90)
    # bad files
    write_empty(root / "zero.mp4")
    write_garbage(root / "noise.webm")
    write_truncated_clip(root / "cut.mp4")
    (root / "notes.mov").write_text("this is not a video")
    write_clip(root / "short.mp4", count=5, fps=24)
    write_clip(root / "tiny.mp4", count=20, fps=15, height=12, width=16)
    write_clip(root / "strip.mp4", count=20, fps=15, height=16, width=128)
    write_image(root / "still.png")
    write_clip(root / "latin1.mp4", count=20, fps=15)
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / ".hidden").mkdir()
    write_garbage(root / ".hidden" / "ignored.mp4")
    return root


def test_scan_keeps_good_clips_and_skips_every_bad_file_with_reason(messy_dataset: Path) -> None:
    scan = scan_dataset(_spec(messy_dataset), seed=0)
    used = sorted({item.path.name for item in scan.items})
    assert used == ["a.mp4", "b.mkv", "c.mp4", "odd.mkv", "rot.mp4"]
    reasons = {s.path.name: s.reason for s in scan.skipped}
    assert set(reasons) == {
        "zero.mp4", "noise.webm", "cut.mp4", "notes.mov", "short.mp4", "tiny.mp4", "strip.mp4",
        "still.png", "latin1.mp4",
    }
    assert "empty file" in reasons["zero.mp4"]
    assert "not a readable video" in reasons["noise.webm"]
    assert "not a readable video" in reasons["cut.mp4"]
    assert "not a readable video" in reasons["notes.mov"]
    assert "too short" in reasons["short.mp4"] and "num_frames 9" in reasons["short.mp4"]
    assert "too small" in reasons["tiny.mp4"]
    assert "aspect ratio" in reasons["strip.mp4"]
    assert "image in a video dataset" in reasons["still.png"]
    assert "not UTF-8" in reasons["latin1.mp4"]
    assert scan.files_found == 14  # hidden folders are not part of the dataset
    warnings = {w.path.name: w.reason for w in scan.caption_warnings}
    assert "missing" in warnings["b.mkv"] and "empty" in warnings["c.mp4"]


def test_items_carry_bucket_window_and_caption(messy_dataset: Path) -> None:
    scan = scan_dataset(_spec(messy_dataset), seed=0)
    by_name = {item.path.name: item for item in scan.items}
    a = by_name["a.mp4"]
    assert a.caption == "a red frame"
    assert a.bucket == Bucket(32, 48, 9)
    assert a.frame_indices == (0, 1, 3, 4, 6, 8, 9, 11, 12)  # 24 -> 15 fps
    assert by_name["b.mkv"].caption == ""
    assert by_name["rot.mp4"].source_size == (48, 64)  # upright
    assert by_name["odd.mkv"].source_size == (47, 63)
    assert by_name["odd.mkv"].bucket.height % 16 == 0


def test_clip_pixels_follow_the_window(messy_dataset: Path) -> None:
    item = next(i for i in scan_dataset(_spec(messy_dataset)).items if i.path.name == "a.mp4")
    pixels = load_clip_pixels(item)
    assert pixels.shape == (3, 9, 32, 48) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert [read_index(f) for f in _to_uint8(pixels)] == list(item.frame_indices)


def test_rotated_clip_pixels_are_upright(messy_dataset: Path) -> None:
    item = next(i for i in scan_dataset(_spec(messy_dataset)).items if i.path.name == "rot.mp4")
    frame = _to_uint8(load_clip_pixels(item))[0]
    assert frame.shape == (32, 48, 3)
    assert frame[2, 2, 0] > 200 and frame[2, 2, 1] < 60  # red marker stays top-left
    assert abs(int(frame[-3, -3, 0]) - 96) < 20


def test_keys_and_fingerprints(messy_dataset: Path) -> None:
    first = {i.key: i.fingerprint() for i in scan_dataset(_spec(messy_dataset)).items}
    again = {i.key: i.fingerprint() for i in scan_dataset(_spec(messy_dataset)).items}
    assert first == again
    clip = messy_dataset / "a.mp4"
    stat = clip.stat()
    os.utime(clip, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000))
    touched = {i.key: i.fingerprint() for i in scan_dataset(_spec(messy_dataset)).items}
    changed = [k for k in first if first[k] != touched[k]]
    assert len(changed) == 1 and "a.mp4" in changed[0]
    longer = {i.key: i.fingerprint() for i in scan_dataset(_spec(messy_dataset, num_frames=5)).items}
    assert all(longer[k] != first[k] for k in first)


@pytest.mark.parametrize("size", [200_000, 9 << 20])  # hashed whole / sampled
def test_a_file_replaced_with_its_size_and_mtime_kept_gets_another_stamp(tmp_path: Path, size: int) -> None:
    # what `cp -p` or `rsync -a` of an edited clip looks like to size + mtime alone
    path = tmp_path / "clip.mp4"
    path.write_bytes(np.random.default_rng(0).bytes(size))
    before = FileStamp.of(path)
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01  # inside the head, which every sample covers
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = FileStamp.of(path)
    assert (after.size, after.mtime_ns) == (before.size, before.mtime_ns)
    assert after.as_dict() != before.as_dict()


def test_repeats_and_uniform_windows(tmp_path: Path) -> None:
    write_clip(tmp_path / "long.mp4", count=60, fps=30)  # 30 frames at 15 fps
    scan = scan_dataset(_spec(tmp_path, frame_window="uniform", repeats=1, caption_strategy=None))
    assert len(scan.items) == 6  # 3 windows x (1 + 1 repeat)
    windows = sorted({(i.window_index, i.frame_indices[0]) for i in scan.items})
    assert windows == [(0, 0), (1, 20), (2, 42)]  # starts 0, 10, 21 on the 15 fps timeline
    assert len({i.key for i in scan.items}) == 3


def test_random_windows_and_crops_are_seeded(tmp_path: Path) -> None:
    for n in range(4):
        write_clip(tmp_path / f"c{n}.mp4", count=60, fps=30, height=48, width=96)
    spec = _spec(tmp_path, frame_window="random", crop_style="random", crop_aspect="square", caption_strategy=None)
    one = [(i.frame_indices, i.crop) for i in scan_dataset(spec, seed=3).items]
    assert one == [(i.frame_indices, i.crop) for i in scan_dataset(spec, seed=3).items]
    assert one != [(i.frame_indices, i.crop) for i in scan_dataset(spec, seed=4).items]


def test_caption_strategies(tmp_path: Path) -> None:
    write_clip(tmp_path / "my_red-clip.mp4", count=20, fps=15)
    assert scan_dataset(_spec(tmp_path, caption_strategy="filename")).items[0].caption == "my red clip"
    spec = _spec(tmp_path, caption_strategy="instanceprompt", instance_prompt="sks style")
    assert scan_dataset(spec).items[0].caption == "sks style"


def test_image_dataset(tmp_path: Path) -> None:
    write_image(tmp_path / "a.jpg", height=64, width=64)
    write_clip(tmp_path / "v.mp4", count=20, fps=15)
    scan = scan_dataset(_spec(tmp_path, dataset_type="image", caption_strategy=None))
    assert [i.bucket for i in scan.items] == [Bucket(32, 32, 1)]
    assert load_clip_pixels(scan.items[0]).shape == (3, 1, 32, 32)
    assert "video in an image dataset" in scan.skipped[0].reason


def _i2v_dataset(tmp_path: Path) -> tuple[DataSpec, dict[str, DataSpec]]:
    clips, starts = tmp_path / "clips", tmp_path / "starts"
    encode(clips / "paired.mp4", marker_frames(20, 48, 64), fps=15)
    encode(clips / "big_start.mp4", marker_frames(20, 48, 64), fps=15)
    encode(clips / "lonely.mp4", marker_frames(20, 48, 64), fps=15)
    write_image(starts / "paired.png", height=48, width=64, colour=(10, 200, 30))
    Image.fromarray(marker_frames(1, 96, 128)[0]).save(starts / "big_start.png")
    write_garbage(starts / "broken.png")
    cond = _spec(starts, id="starts", dataset_type="conditioning", caption_strategy=None)
    video = _spec(clips, is_i2v=True, conditioning_data=("starts",), caption_strategy=None)
    return video, {"starts": cond}


def test_pairing_by_stem_with_fallback(tmp_path: Path) -> None:
    video, conditioning = _i2v_dataset(tmp_path)
    scan = scan_dataset(video, conditioning)
    by_name = {i.path.name: i for i in scan.items}
    assert by_name["paired.mp4"].start_frame == tmp_path / "starts" / "paired.png"
    assert by_name["lonely.mp4"].start_frame is None
    assert scan.fallbacks == [tmp_path / "clips" / "lonely.mp4"] and scan.paired == 2
    assert all(i.is_i2v for i in scan.items)

    start = load_start_frame_pixels(by_name["paired.mp4"])
    assert start.shape == (3, 1, 32, 48)
    assert _to_uint8(start)[0, 16, 24].tolist() == pytest.approx([10, 200, 30], abs=3)

    # fallback: the clip's own first window frame, processed identically
    lonely = by_name["lonely.mp4"]
    assert torch.equal(load_start_frame_pixels(lonely), load_clip_pixels(lonely)[:, :1])

    # a start image at another size is fitted to the clip's source size first, so it lines up
    big = by_name["big_start.mp4"]
    diff = (load_start_frame_pixels(big) - load_clip_pixels(big)[:, :1]).abs().mean()
    assert diff < 0.05
    assert by_name["paired.mp4"].start_frame_fingerprint()["source"]["path"].endswith("paired.png")
    assert lonely.start_frame_fingerprint()["fallback_from"]["path"].endswith("lonely.mp4")


def test_strict_pairing_skips_unmatched_clips(tmp_path: Path) -> None:
    video, conditioning = _i2v_dataset(tmp_path)
    strict = DataSpec(**{**video.__dict__, "strict_pairing": True})
    scan = scan_dataset(strict, conditioning)
    assert sorted({i.path.name for i in scan.items}) == ["big_start.mp4", "paired.mp4"]
    assert [s.path.name for s in scan.skipped] == ["lonely.mp4"]
    assert "strict_pairing" in scan.skipped[0].reason and scan.fallbacks == []


def test_dataset_level_problems_raise(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not a directory"):
        scan_dataset(_spec(tmp_path / "nope"))
    video, _ = _i2v_dataset(tmp_path)
    with pytest.raises(DatasetError, match="starts"):
        scan_dataset(video, {})


def test_disabled_and_conditioning_datasets_yield_nothing(tmp_path: Path) -> None:
    write_clip(tmp_path / "a.mp4", count=20, fps=15)
    assert scan_dataset(_spec(tmp_path, disabled=True)).items == []
    assert scan_dataset(_spec(tmp_path, dataset_type="conditioning")).items == []


def test_spec_from_config_object(tmp_path: Path) -> None:
    cfg = DatasetConfig(
        id="d", type="local", dataset_type="video", is_i2v=True, instance_data_dir=str(tmp_path),
        caption_strategy=None, instance_prompt=None, resolution=480, resolution_type="pixel",
        cache_dir_vae="cache", conditioning_data=["s"], repeats=2, probability=0.5, crop=True,
        crop_style="center", crop_aspect="preserve", disabled=False, i2v_probability=0.8,
        caption_dropout_probability=0.1, strict_pairing=True, fps="source", frame_window="middle",
        video={"num_frames": 33, "min_frames": None, "max_frames": None, "bucket_strategy": "aspect_ratio",
               "frame_interval": 8},
    )
    spec = DataSpec.from_dataset_config(cfg, alignment=32)
    assert spec.alignment == 32 and spec.num_frames == 33 and spec.frame_interval == 8
    assert spec.fps == "source" and spec.conditioning_data == ("s",) and spec.caption_strategy is None
    assert spec.instance_data_dir == tmp_path and spec.repeats == 2 and spec.strict_pairing
