"""Decode clips with PyAV: exact frame counts, timestamps, rotation, fps resampling, windows.

Frame counts always come from decoding: container headers and fps x duration are wrong for
variable-frame-rate, edited and truncated files.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import av
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".mkv", ".webm", ".avi"})
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp"})

# Timestamps are compared in float seconds; this absorbs rounding of pts * time_base so that a
# tick falling exactly on a frame's timestamp picks that frame.
_TIME_EPSILON = 1e-6

WindowMode = Literal["start", "middle", "random", "uniform"]


class ClipDecodeError(Exception):
    """A file that cannot be used; `reason` is the human-readable cause shown in reports."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class ClipInfo:
    """What decoding a file revealed. `width`/`height` are upright (after rotation)."""

    path: Path
    width: int
    height: int
    rotation: int  # counter-clockwise degrees applied to decoded frames to make them upright
    timestamps: tuple[float, ...]  # seconds from the first frame, one per decoded frame
    end_time: float  # timestamp at which the last frame stops being shown
    is_image: bool = False

    @property
    def frame_count(self) -> int:
        return len(self.timestamps)

    @property
    def average_fps(self) -> float:
        return self.frame_count / self.end_time if self.end_time > 0 else 0.0

    @property
    def is_variable_frame_rate(self) -> bool:
        if self.frame_count < 3:
            return False
        gaps = np.diff(np.asarray(self.timestamps))
        return bool(gaps.max() - gaps.min() > 1e-3)


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _upright(frame: np.ndarray, rotation: int) -> np.ndarray:
    # np.rot90 turns counter-clockwise for positive k, matching the display-matrix convention.
    k = (rotation // 90) % 4
    return np.ascontiguousarray(np.rot90(frame, k)) if k else frame


def _stream_rotation_from_metadata(stream: av.video.stream.VideoStream) -> int:
    # Legacy files carry a `rotate` tag (clockwise degrees) instead of a display matrix.
    for key, value in stream.metadata.items():
        if key.lower() == "rotate":
            try:
                return -int(round(float(value))) % 360
            except ValueError:
                return 0
    return 0


def _frame_rotation(frame: av.VideoFrame, fallback: int) -> int:
    rotation = int(round(frame.rotation)) % 360
    if rotation % 90 != 0:
        return 0  # free-angle display matrices are not training data we can reproduce
    return rotation or fallback


def _open_video(path: Path) -> av.container.InputContainer:
    if not path.is_file():
        raise ClipDecodeError(path, "file not found")
    if path.stat().st_size == 0:
        raise ClipDecodeError(path, "empty file (0 bytes)")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, UnicodeDecodeError) as err:
        raise ClipDecodeError(path, f"not a readable video ({err.__class__.__name__}: {err})") from None
    if not container.streams.video:
        container.close()
        raise ClipDecodeError(path, "no video stream")
    return container


def _probe_image(path: Path) -> ClipInfo:
    image = _read_image(path)
    return ClipInfo(
        path=path, width=image.shape[1], height=image.shape[0], rotation=0,
        timestamps=(0.0,), end_time=0.0, is_image=True,
    )


def _read_image(path: Path) -> np.ndarray:
    if not path.is_file():
        raise ClipDecodeError(path, "file not found")
    if path.stat().st_size == 0:
        raise ClipDecodeError(path, "empty file (0 bytes)")
    try:
        with Image.open(path) as image:
            upright = ImageOps.exif_transpose(image)
            return np.asarray(upright.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ClipDecodeError(path, f"image failed to decode ({err})") from None


def _probe_video(path: Path) -> ClipInfo:
    container = _open_video(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        declared = stream.frames  # 0 when the container does not say
        fallback_rotation = _stream_rotation_from_metadata(stream)
        times: list[float] = []
        durations: list[float] = []
        rotation = 0
        width = height = 0
        try:
            for frame in container.decode(stream):
                if frame.is_corrupt:
                    raise ClipDecodeError(path, f"corrupt frame at index {len(times)}")
                if not times:
                    rotation = _frame_rotation(frame, fallback_rotation)
                    width, height = frame.width, frame.height
                time = frame.time
                if time is None:  # no timestamps at all (rare raw streams): assume the nominal rate
                    rate = float(stream.average_rate or stream.guessed_rate or 0) or None
                    if rate is None:
                        raise ClipDecodeError(path, "frames carry no timestamps and no frame rate")
                    time = len(times) / rate
                times.append(float(time))
                if frame.duration and frame.time_base:
                    durations.append(float(frame.duration * frame.time_base))
        except av.error.FFmpegError as err:
            raise ClipDecodeError(
                path, f"decoding failed after {len(times)} frames, file truncated or corrupt ({err})"
            ) from None
    finally:
        container.close()
    if not times:
        raise ClipDecodeError(path, "no decodable frames")
    if declared and len(times) < declared:
        raise ClipDecodeError(path, f"truncated: header declares {declared} frames, only {len(times)} decode")
    origin = times[0]
    relative = [t - origin for t in times]
    if any(b < a - _TIME_EPSILON for a, b in zip(relative, relative[1:])):
        raise ClipDecodeError(path, "frame timestamps go backwards")
    gaps = np.diff(relative)
    last_duration = durations[-1] if durations else (float(np.median(gaps)) if len(gaps) else 0.0)
    if rotation in (90, 270):
        width, height = height, width
    return ClipInfo(
        path=path, width=width, height=height, rotation=rotation,
        timestamps=tuple(relative), end_time=relative[-1] + last_duration,
    )


@functools.lru_cache(maxsize=8192)
def _probe_cached(path_str: str, size: int, mtime_ns: int) -> ClipInfo:
    # size and mtime are part of the key so an edited file is probed again.
    path = Path(path_str)
    return _probe_image(path) if is_image_path(path) else _probe_video(path)


def probe_clip(path: Path) -> ClipInfo:
    """Decode `path` once to learn its frame count, timestamps, upright size and rotation.

    Raises `ClipDecodeError` with a reason for any file that cannot be used. Results are cached
    in memory per (path, size, mtime).
    """
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        raise ClipDecodeError(path, "file not found") from None
    return _probe_cached(str(path), stat.st_size, stat.st_mtime_ns)


def resample_timestamps(info: ClipInfo, target_fps: float | Literal["source"]) -> tuple[int, ...]:
    """For each output tick k / target_fps, the source frame on screen at that time.

    The shown frame is the latest one whose timestamp is at or before the tick (nearest-previous),
    which is how a player displays variable-frame-rate video. Ticks run while t < `end_time`.
    `"source"` keeps every decoded frame.
    """
    if target_fps == "source" or info.is_image:
        return tuple(range(info.frame_count))
    ticks = int(np.floor(info.end_time * target_fps - _TIME_EPSILON)) + 1
    ticks = max(ticks, 1)
    return tuple(
        max(0, bisect.bisect_right(info.timestamps, k / target_fps + _TIME_EPSILON) - 1)
        for k in range(ticks)
    )


def seeded_rng(seed: int, key: str) -> random.Random:
    # Python's hash() is salted per process; a digest keeps choices identical across runs.
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def select_windows(
    timeline: Sequence[int], num_frames: int, mode: WindowMode, seed: int = 0, key: str = ""
) -> list[tuple[int, ...]]:
    """Windows of `num_frames` consecutive entries of a resampled `timeline`.

    `start`, `middle` and `random` give one window; `random` is seeded by (`seed`, `key`) so a
    clip gets the same window in every run. `uniform` gives floor(len / num_frames) windows
    (at least one) spread evenly from the first to the last possible start. An empty list means
    the timeline is shorter than the window.
    """
    length = len(timeline)
    if length < num_frames:
        return []
    last_start = length - num_frames
    if mode == "start":
        starts = [0]
    elif mode == "middle":
        starts = [last_start // 2]
    elif mode == "random":
        starts = [seeded_rng(seed, key).randint(0, last_start)]
    elif mode == "uniform":
        count = max(1, length // num_frames)
        starts = [0] if count == 1 else [i * last_start // (count - 1) for i in range(count)]
    else:
        raise ValueError(f"unknown frame_window {mode!r}: use start, middle, random or uniform")
    return [tuple(timeline[s : s + num_frames]) for s in starts]


def decode_frames(path: Path, source_indices: Sequence[int]) -> np.ndarray:
    """Decode the given source frame indices (repeats allowed) as upright uint8 [F, H, W, 3].

    Decoding stops after the last needed frame.
    """
    path = Path(path)
    if not source_indices:
        raise ValueError("decode_frames needs at least one frame index")
    if is_image_path(path):
        image = _read_image(path)
        return np.stack([image] * len(source_indices))
    wanted = set(source_indices)
    last = max(source_indices)
    found: dict[int, np.ndarray] = {}
    container = _open_video(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fallback_rotation = _stream_rotation_from_metadata(stream)
        rotation: int | None = None
        try:
            for index, frame in enumerate(container.decode(stream)):
                if rotation is None:
                    rotation = _frame_rotation(frame, fallback_rotation)
                if index in wanted:
                    found[index] = _upright(frame.to_ndarray(format="rgb24"), rotation)
                if index >= last:
                    break
        except av.error.FFmpegError as err:
            raise ClipDecodeError(path, f"decoding failed after {len(found)} frames ({err})") from None
    finally:
        container.close()
    missing = wanted - found.keys()
    if missing:
        raise ClipDecodeError(path, f"file has fewer frames than expected (missing index {min(missing)}); rescan it")
    return np.stack([found[i] for i in source_indices])
