"""Real small media files written with PyAV / Pillow for the data tests.

Frames carry their own index in their colour (`index_frames` / `read_index`) so a test can tell
exactly which source frame a decode returned, through lossy H.264.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Sequence

import av
import numpy as np
from PIL import Image

from longcat_train.video_io import write_video

# Index digits are stored as 16-level steps: wide enough to survive RGB -> yuv420p -> RGB.
_STEP = 16


def index_frames(count: int, height: int = 48, width: int = 64) -> np.ndarray:
    """uint8 [count, H, W, 3]; frame i is a flat colour encoding i (up to 255)."""
    frames = np.empty((count, height, width, 3), dtype=np.uint8)
    for i in range(count):
        frames[i] = ((i % _STEP) * _STEP + 8, (i // _STEP) * _STEP + 8, 128)
    return frames


def read_index(frame: np.ndarray) -> int:
    """Recover the index written by `index_frames` from a decoded frame (uses the centre)."""
    h, w = frame.shape[:2]
    centre = frame[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4].reshape(-1, 3).mean(axis=0)
    low = int(round((centre[0] - 8) / _STEP))
    high = int(round((centre[1] - 8) / _STEP))
    return high * _STEP + low


def read_video(path: Path) -> tuple[np.ndarray, float]:
    """Every frame of `path` as uint8 [F, H, W, 3] (RGB), and its average frame rate."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        return frames, float(stream.average_rate)


def write_clip(
    path: Path, count: int, fps: float = 24, height: int = 48, width: int = 64,
    codec: str = "libx264", pix_fmt: str = "yuv420p",
) -> Path:
    """A constant-frame-rate clip of `count` index-coded frames in any container/codec."""
    frames = index_frames(count, height, width)
    if codec == "libx264" and pix_fmt == "yuv420p" and path.suffix == ".mp4":
        return write_video(path, frames, fps)
    return encode(path, frames, fps=fps, codec=codec, pix_fmt=pix_fmt)


def encode(
    path: Path, frames: np.ndarray, fps: float = 24, codec: str = "libx264", pix_fmt: str = "yuv420p",
    times: Sequence[float] | None = None, display_rotation: int | None = None,
    rotate_tag: int | None = None,
) -> Path:
    """Encode frames with full control: explicit `times` (seconds, variable frame rate),
    a display matrix (`display_rotation`, counter-clockwise degrees) or a legacy `rotate`
    metadata tag (clockwise degrees)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = pix_fmt
        if times is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if display_rotation is not None:
            stream.set_display_rotation(display_rotation)
        if rotate_tag is not None:
            stream.metadata["rotate"] = str(rotate_tag)
        for i, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
            if times is not None:
                frame.pts = int(round(times[i] * 1000))
                frame.time_base = Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def write_vfr_clip(path: Path, times: Sequence[float], height: int = 48, width: int = 64) -> Path:
    """A variable-frame-rate mp4: frame i is shown from `times[i]` seconds."""
    return encode(path, index_frames(len(times), height, width), times=times)


def marker_frames(count: int, height: int, width: int) -> np.ndarray:
    """Upright frames: grey, with a red block in the top-left corner."""
    frames = np.full((count, height, width, 3), 96, dtype=np.uint8)
    frames[:, : height // 3, : width // 3] = (255, 0, 0)
    return frames


def write_rotated_clip(
    path: Path, upright: np.ndarray, rotation_ccw: int, via: str = "matrix"
) -> Path:
    """Store `upright` frames so that a player applying the rotation shows them upright.

    `via="matrix"` writes a display matrix (mp4); `via="tag"` writes the legacy clockwise
    `rotate` tag (kept as metadata by the Matroska muxer, so use a .mkv path).
    """
    stored = np.ascontiguousarray(np.rot90(upright, -(rotation_ccw // 90), axes=(1, 2)))
    if via == "matrix":
        return encode(path, stored, display_rotation=rotation_ccw)
    return encode(path, stored, rotate_tag=(-rotation_ccw) % 360)


def write_image(path: Path, height: int = 48, width: int = 64, colour: tuple[int, int, int] = (200, 40, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), colour, dtype=np.uint8)).save(path)
    return path


def write_truncated_clip(path: Path, count: int = 24) -> Path:
    """An mp4 cut in half (its index, written last, is lost)."""
    write_clip(path, count)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_garbage(path: Path, size: int = 4096) -> Path:
    """Random bytes under any name (a non-video with a video extension)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def write_empty(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path
