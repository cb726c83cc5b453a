"""`validation_continuation_video`: the clip a validation continues, checked when the config loads.

PyAV directly rather than `data/decode.py`: the config sits below the data layer and loads
without torch. The clip is decoded once (a validation clip is short), so a broken or short file
stops the run before any caching or model loading.
"""

from __future__ import annotations

import math
from pathlib import Path

from longcat_train.config.problems import ProblemList
from longcat_train.release_facts import DEFAULT_FPS

_TIME_EPSILON = 1e-6


class _Unusable(Exception):
    pass


def _frames_at_rate(path: Path, fps: float) -> int:
    """How many frames `path` shows at `fps` (ticks k / fps before its last frame ends), counted by
    decoding it; raises `_Unusable` with the reason when it cannot be decoded."""
    import av  # here: every command imports the config, few configs name a clip

    times: list[float] = []
    last_duration = 0.0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise _Unusable("holds no video stream")
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                if frame.time is not None:
                    times.append(float(frame.time))
                if frame.duration and frame.time_base:
                    last_duration = float(frame.duration * frame.time_base)
            rate = float(stream.average_rate or 0)
    except (av.error.FFmpegError, UnicodeDecodeError) as error:
        raise _Unusable(f"cannot be decoded ({error.__class__.__name__}: {error})") from None
    if not times:
        raise _Unusable("has no decodable frame")
    end = max(times) - min(times) + (last_duration or (1.0 / rate if rate else 0.0))
    return math.floor(end * fps - _TIME_EPSILON) + 1


def check_continuation_video(path: Path, cond_frames: int, file: Path | str, problems: ProblemList) -> None:
    """Add a problem with `validation_continuation_video` when `path` is missing, undecodable, or shows fewer
    than `cond_frames` frames at the render rate."""
    key, frames_key = "validation_continuation_video", "validation_continuation_cond_frames"
    if not path.is_file():
        problems.add(file, key, str(path), "is a directory, not a clip" if path.exists() else "file does not exist",
                     "give a video clip (mp4, mov, mkv, webm); relative paths start at the config file's folder")
        return
    try:
        available = _frames_at_rate(path, DEFAULT_FPS)
    except _Unusable as unusable:
        problems.add(file, key, str(path), f"the clip {unusable}",
                     "give a clip PyAV can decode, or re-encode it: ffmpeg -i CLIP -c:v libx264 clip.mp4")
        return
    if available < cond_frames:
        problems.add(file, key, str(path),
                     f"the clip has {available} frames at {DEFAULT_FPS} fps; continuing it needs its last {cond_frames} "
                     f"({frames_key})",
                     f"give a clip of at least {cond_frames / DEFAULT_FPS:.2f} s, or lower {frames_key} (1 + 4k, e.g. 5)")
