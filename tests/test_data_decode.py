"""Decoding real PyAV-written clips: frame counts, resampling, windows, rotation, bad files."""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np
import pytest

from longcat_train.data.decode import (
    ClipDecodeError,
    decode_frames,
    probe_clip,
    resample_timestamps,
    select_windows,
)
from longcat_train.release_facts import is_valid_frame_count, nearest_valid_frame_counts
from longcat_train.video_io import write_video
from .media_factory import (
    encode,
    index_frames,
    marker_frames,
    read_index,
    write_clip,
    write_empty,
    write_garbage,
    write_image,
    write_rotated_clip,
    write_truncated_clip,
    write_vfr_clip,
)


@pytest.mark.parametrize("fps", [24, 30, 60])
def test_constant_rate_counts_and_resampling_to_15fps(tmp_path: Path, fps: int) -> None:
    clip = write_clip(tmp_path / f"c{fps}.mp4", count=2 * fps, fps=fps)
    info = probe_clip(clip)
    assert info.frame_count == 2 * fps
    assert not info.is_variable_frame_rate
    assert info.end_time == pytest.approx(2.0)
    timeline = resample_timestamps(info, 15)
    assert len(timeline) == 30  # 2 s at 15 fps
    # tick k at k/15 s shows source frame floor(k * fps / 15)
    assert timeline == tuple(int(k * fps // 15) for k in range(30))


def test_source_fps_keeps_every_frame(tmp_path: Path) -> None:
    info = probe_clip(write_clip(tmp_path / "c.mp4", count=17, fps=24))
    assert resample_timestamps(info, "source") == tuple(range(17))


def test_variable_frame_rate_counts_and_nearest_previous_frame(tmp_path: Path) -> None:
    times = [0.0, 0.1, 0.15, 0.5, 0.55, 0.9, 1.0]
    info = probe_clip(write_vfr_clip(tmp_path / "vfr.mp4", times))
    assert info.frame_count == 7
    assert info.timestamps == pytest.approx(times)
    assert info.is_variable_frame_rate
    # ticks 0, .1, ..., 1.0 s (the last frame lasts until 1.05 s)
    assert resample_timestamps(info, 10) == (0, 1, 2, 2, 2, 3, 4, 4, 4, 5, 6)


def test_upsampling_repeats_frames(tmp_path: Path) -> None:
    info = probe_clip(write_clip(tmp_path / "c.mp4", count=10, fps=10))
    assert resample_timestamps(info, 20) == tuple(i // 2 for i in range(20))


def test_decode_frames_returns_requested_indices_in_order_with_repeats(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "c.mp4", count=40, fps=30)
    frames = decode_frames(clip, [3, 3, 17, 0, 39])
    assert frames.shape == (5, 48, 64, 3) and frames.dtype == np.uint8
    assert [read_index(f) for f in frames] == [3, 3, 17, 0, 39]


def test_decode_frames_reports_missing_frames(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "c.mp4", count=5, fps=30)
    with pytest.raises(ClipDecodeError, match="fewer frames"):
        decode_frames(clip, [7])


def test_frame_count_rule_and_suggestions() -> None:
    assert [n for n in range(1, 20) if is_valid_frame_count(n)] == [1, 5, 9, 13, 17]
    assert nearest_valid_frame_counts(93) == (93, 93)
    assert nearest_valid_frame_counts(90) == (89, 93)
    assert nearest_valid_frame_counts(94) == (93, 97)
    assert nearest_valid_frame_counts(2) == (1, 5)


def test_windows_start_middle_uniform() -> None:
    timeline = tuple(range(100, 120))  # 20 entries
    assert select_windows(timeline, 5, "start") == [(100, 101, 102, 103, 104)]
    assert select_windows(timeline, 5, "middle") == [tuple(range(107, 112))]
    uniform = select_windows(timeline, 5, "uniform")
    assert [w[0] for w in uniform] == [100, 105, 110, 115]
    assert [w[0] for w in select_windows(tuple(range(13)), 5, "uniform")] == [0, 8]
    assert select_windows(timeline, 21, "start") == []


def test_random_window_is_seeded_per_key() -> None:
    timeline = tuple(range(200))
    first = select_windows(timeline, 9, "random", seed=7, key="a.mp4")
    assert first == select_windows(timeline, 9, "random", seed=7, key="a.mp4")
    starts = {select_windows(timeline, 9, "random", seed=s, key=k)[0][0] for s in range(5) for k in "abcd"}
    assert len(starts) > 5  # different seeds/keys pick different windows
    assert all(0 <= s <= 191 for s in starts)


@pytest.mark.parametrize("rotation", [90, 180, 270])
@pytest.mark.parametrize("via,suffix", [("matrix", ".mp4"), ("tag", ".mkv")])
def test_rotated_clips_come_out_upright(tmp_path: Path, rotation: int, via: str, suffix: str) -> None:
    upright = marker_frames(3, height=48, width=80)  # red block top-left
    clip = write_rotated_clip(tmp_path / f"r{rotation}{suffix}", upright, rotation, via=via)
    info = probe_clip(clip)
    assert info.rotation == rotation
    assert (info.height, info.width) == (48, 80)
    frame = decode_frames(clip, [0])[0]
    assert frame.shape == (48, 80, 3)
    assert frame[4, 4, 0] > 200 and frame[4, 4, 1] < 60  # red marker top-left
    for corner in (frame[4, -5], frame[-5, 4], frame[-5, -5]):
        assert abs(int(corner[0]) - 96) < 20  # the other corners are grey


def test_stored_dims_swap_for_quarter_turns(tmp_path: Path) -> None:
    upright = marker_frames(2, height=48, width=80)
    clip = write_rotated_clip(tmp_path / "r.mp4", upright, 90)
    with av.open(str(clip)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.height, stream.codec_context.width) == (80, 48)


def test_odd_sized_frames_decode(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "odd.mkv", count=6, fps=24, height=47, width=63, codec="ffv1", pix_fmt="yuv444p")
    info = probe_clip(clip)
    assert (info.height, info.width, info.frame_count) == (47, 63, 6)
    assert decode_frames(clip, [5]).shape == (1, 47, 63, 3)


@pytest.mark.parametrize(
    "make,reason",
    [
        (lambda p: write_empty(p / "zero.mp4"), "empty file"),
        (lambda p: write_garbage(p / "noise.mp4"), "not a readable video"),
        (lambda p: write_truncated_clip(p / "cut.mp4"), "not a readable video"),
        (lambda p: write_garbage(p / "noise.png"), "image failed to decode"),
        (lambda p: p / "missing.mp4", "file not found"),
    ],
)
def test_bad_files_raise_with_reason(tmp_path: Path, make, reason: str) -> None:
    with pytest.raises(ClipDecodeError, match=reason) as err:
        probe_clip(make(tmp_path))
    assert err.value.path.parent == tmp_path


def test_images_probe_as_single_frames(tmp_path: Path) -> None:
    image = write_image(tmp_path / "a.png", height=30, width=40)
    info = probe_clip(image)
    assert info.is_image and info.frame_count == 1 and (info.height, info.width) == (30, 40)
    assert resample_timestamps(info, 15) == (0,)
    assert decode_frames(image, [0, 0]).shape == (2, 30, 40, 3)


def test_probe_cache_sees_edits(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "c.mp4", count=8)
    assert probe_clip(clip).frame_count == 8
    write_clip(clip, count=12)
    stat = clip.stat()
    os.utime(clip, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert probe_clip(clip).frame_count == 12


def test_write_video_round_trip_and_errors(tmp_path: Path) -> None:
    frames = index_frames(9, 32, 48)
    out = write_video(tmp_path / "sub" / "v.mp4", frames, fps=15)
    info = probe_clip(out)
    assert info.frame_count == 9 and (info.height, info.width) == (32, 48)
    assert info.average_fps == pytest.approx(15)
    assert [read_index(f) for f in decode_frames(out, range(9))] == list(range(9))
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", index_frames(2, 33, 48), fps=15)
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "f.mp4", frames.astype(np.float32), fps=15)


def test_encode_helper_writes_requested_codec(tmp_path: Path) -> None:
    clip = encode(tmp_path / "v.webm", index_frames(4), fps=24, codec="libvpx")
    assert probe_clip(clip).frame_count == 4
