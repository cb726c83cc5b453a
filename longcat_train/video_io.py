"""Write H.264 mp4 files with PyAV (validation renders, demo datasets, tests)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def write_video(path: Path, frames: np.ndarray, fps: float | Fraction, crf: int = 18) -> Path:
    """Encode uint8 frames [F, H, W, 3] (RGB) as H.264 yuv420p at a constant `fps`.

    yuv420p stores colour at half resolution, so H and W must be even; it is the pixel format
    every player accepts. `crf` trades size for quality (0 lossless .. 51 worst; 18 is visually
    lossless). Parent folders are created. Returns `path`.
    """
    path = Path(path)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(
            f"write_video({path}): frames must be uint8 [F, H, W, 3], got {frames.dtype} {list(frames.shape)}"
        )
    count, height, width, _ = frames.shape
    if count == 0:
        raise ValueError(f"write_video({path}): no frames to write")
    if height % 2 or width % 2:
        raise ValueError(
            f"write_video({path}): H.264 yuv420p needs even sizes, got {width}x{height}; crop or pad by one pixel"
        )
    rate = Fraction(fps).limit_denominator(1_000_000)
    if rate <= 0:
        raise ValueError(f"write_video({path}): fps must be positive, got {fps}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for pixels in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path
