"""Video continuation (the official `generate_vc`): a clip's last frames condition a render.

The frames are taken at the render rate (15 fps, by timestamps, as the datasets resample), fitted to
the render size, and encoded by the VAE into `1 + (frames − 1) // 4` clean latent frames; the
render then shows these frames followed by the new ones, as the official demo writes it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from longcat_train.config.orientation import follow_orientation
from longcat_train.data import ClipDecodeError, ClipInfo, decode_frames, probe_clip, resample_timestamps
from longcat_train.release_facts import DEFAULT_FPS

from .render import fit_pixels


def continuation_size(path: Path, size: tuple[int, int]) -> tuple[int, int]:
    """The render size (height, width) `size` turned to the clip's orientation."""
    info = _probe(path)
    return follow_orientation(size, (info.height, info.width))


def load_condition_frames(path: Path, count: int, height: int, width: int) -> torch.Tensor:
    """The clip's last `count` frames at the render rate as `[3, count, height, width]` float32 in
    [-1, 1] (cover-resized, centre-cropped)."""
    timeline = resample_timestamps(_probe(path), DEFAULT_FPS)
    if len(timeline) < count:
        raise ValueError(f"video {path} has {len(timeline)} frames at {DEFAULT_FPS} fps; the continuation needs its "
                         f"last {count}. Fix: give a longer clip, or fewer condition frames (1 + 4k, e.g. 5).")
    try:
        frames = decode_frames(path, timeline[-count:])
    except ClipDecodeError as error:
        raise ValueError(f"cannot decode video {path}: {error.reason}. Fix: re-encode it, e.g. "
                         "ffmpeg -i CLIP -c:v libx264 clip.mp4") from error
    pixels = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0
    return fit_pixels(pixels, height, width)


def _probe(path: Path) -> ClipInfo:
    try:
        return probe_clip(path)
    except ClipDecodeError as error:
        raise ValueError(f"cannot read video {path}: {error.reason}. Fix: give a clip PyAV can decode "
                         "(mp4, mov, mkv, webm), or re-encode it: ffmpeg -i CLIP -c:v libx264 clip.mp4") from error
