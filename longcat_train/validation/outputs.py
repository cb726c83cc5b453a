"""What a render leaves on disk: an H.264 mp4 (15 fps; refined renders 30) and a PNG contact sheet."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from longcat_train.video_io import write_video

# LongCat-Video generates at 15 fps (the official pipeline writes its renders at this rate).
RENDER_FPS = 15
SHEET_FRAMES = 8
SHEET_COLUMNS = 4
_UNSAFE = re.compile(r"[^A-Za-z0-9]+")


@dataclass(frozen=True)
class RenderFiles:
    video: Path
    sheet: Path

    def paths(self) -> list[Path]:
        return [self.video, self.sheet]


def render_stem(index: int, prompt: str, max_chars: int = 40) -> str:
    """A file-name stem like `00_a-cat-walks-across` that sorts in render order."""
    slug = _UNSAFE.sub("-", prompt).strip("-").lower()[:max_chars].strip("-")
    return f"{index:02d}_{slug or 'render'}"


def even_frames(frames: np.ndarray) -> np.ndarray:
    """Drop a last row / column so H.264 yuv420p gets even sizes (renders are multiples of 16,
    so this only matters for odd user sizes)."""
    height, width = frames.shape[1] - frames.shape[1] % 2, frames.shape[2] - frames.shape[2] % 2
    return frames[:, :height, :width]


def contact_sheet(frames: np.ndarray, count: int = SHEET_FRAMES, columns: int = SHEET_COLUMNS) -> Image.Image:
    """`count` evenly spaced frames (first and last included) of uint8 `[F, H, W, 3]` in a grid."""
    picks = np.unique(np.linspace(0, len(frames) - 1, num=min(count, len(frames))).round().astype(int))
    columns = min(columns, len(picks))
    rows = -(-len(picks) // columns)
    height, width = frames.shape[1:3]
    sheet = np.zeros((rows * height, columns * width, 3), dtype=np.uint8)
    for slot, index in enumerate(picks):
        row, column = divmod(slot, columns)
        sheet[row * height : (row + 1) * height, column * width : (column + 1) * width] = frames[index]
    return Image.fromarray(sheet)


def write_render(directory: Path, stem: str, frames: np.ndarray, fps: int = RENDER_FPS) -> RenderFiles:
    """`directory/stem.mp4` (15 fps unless `fps`: a refined render's 30) and `directory/stem.png`
    (contact sheet)."""
    directory.mkdir(parents=True, exist_ok=True)
    video = write_video(directory / f"{stem}.mp4", even_frames(frames), fps)
    sheet = directory / f"{stem}.png"
    contact_sheet(frames).save(sheet)
    return RenderFiles(video=video, sheet=sheet)
