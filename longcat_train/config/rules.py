"""Value rules shared by the config models and the CLI's own options (frames, sizes, alignment).

Each rule raises `pydantic_core.PydanticCustomError` with a `fix` in its context, so a broken
rule inside a model becomes a `ConfigProblem` with the fix attached.
"""

from __future__ import annotations

import re

from typing import Annotated

from pydantic import BeforeValidator, StrictBool
from pydantic_core import PydanticCustomError

from ..release_facts import (
    DEFAULT_FRAMES,
    PIXEL_MULTIPLE,
    VAE_TEMPORAL_STRIDE,
    is_valid_frame_count,
    nearest_valid_frame_counts,
)

BUCKET_ALIGNMENTS = (16, 32, 64)
_RESOLUTION = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")


def check_frames(frames: int) -> int:
    if not is_valid_frame_count(frames):
        below, above = nearest_valid_frame_counts(max(frames, 1))
        choices = f"{below} or {above}" if below != above else f"{below}"
        raise PydanticCustomError(
            "frames_rule",
            "frame count must satisfy (frames - 1) % 4 == 0 (the VAE compresses time 4x after the first frame)",
            {"fix": f"use {choices} ({DEFAULT_FRAMES} is the model's default)"},
        )
    return frames


def _nearest_multiples(value: int, multiple: int) -> str:
    low = (value // multiple) * multiple
    high = low + multiple
    return f"{low} or {high}" if low > 0 else f"{high}"


def parse_resolution(text: str) -> tuple[int, int]:
    """`"480x832"` -> `(480, 832)`: height x width, each a multiple of 16."""
    match = _RESOLUTION.match(text)
    if match is None:
        raise PydanticCustomError(
            "resolution_format",
            "resolution must be written HEIGHTxWIDTH in pixels",
            {"fix": 'write it like "480x832" (height 480, width 832)'},
        )
    height, width = int(match.group(1)), int(match.group(2))
    for name, size in (("height", height), ("width", width)):
        if size <= 0 or size % PIXEL_MULTIPLE != 0:
            raise PydanticCustomError(
                "resolution_multiple",
                f"{name} {size} is not a multiple of 16 (VAE stride 8 x 2x2 patches)",
                {"fix": f"use {name} {_nearest_multiples(size, PIXEL_MULTIPLE)}"},
            )
    return height, width


def check_resolution_text(text: str) -> str:
    height, width = parse_resolution(text)
    return f"{height}x{width}"


def check_alignment(alignment: int) -> int:
    if alignment not in BUCKET_ALIGNMENTS:
        raise PydanticCustomError(
            "alignment",
            "aspect bucket alignment must be 16, 32 or 64 pixels",
            {"fix": "use 64 (default), or 32 to keep 480-pixel edges such as 480x832 exact"},
        )
    return alignment


def check_frame_interval(interval: int) -> int:
    if interval < VAE_TEMPORAL_STRIDE or interval % VAE_TEMPORAL_STRIDE != 0:
        raise PydanticCustomError(
            "frame_interval",
            "frame_interval must be a positive multiple of 4 (the VAE's temporal stride)",
            {"fix": "use 4, 8, 12, ..."},
        )
    return interval


def check_name(name: str) -> str:
    """A dataset or cache id becomes a folder name (`<output_dir>/cache/vae/<id>`): one plain path
    component, so no id can place a cache outside `output_dir`."""
    if name in (".", "..") or any(c in name for c in "/\\") or any(ord(c) < 32 for c in name):
        raise PydanticCustomError(
            "name_rule",
            "an id is a name, not a path: no '/', '\\', control characters, '.' or '..'",
            {"fix": "use letters, digits, '-', '_' or '.' (e.g. \"my-clips\")"},
        )
    return name


def check_path_text(value: object) -> object:
    """A path the filesystem can take: not empty (that would silently mean the config's own folder),
    no NUL byte, no name over 255 bytes and at most 4095 bytes in all (Linux's limits; beyond them
    every file operation fails)."""
    if not isinstance(value, str):
        return value
    if not value.strip():
        raise PydanticCustomError("empty_path", "the path is empty", {"fix": 'name a folder, e.g. "output"'})
    if "\x00" in value:
        raise PydanticCustomError("path_nul", "the path holds a NUL character", {"fix": "remove it"})
    if len(value.encode()) > 4095 or any(len(part.encode()) > 255 for part in value.split("/")):
        raise PydanticCustomError(
            "path_length", "the path is too long (a name over 255 bytes, or over 4095 bytes in all)",
            {"fix": "use a shorter path"},
        )
    return value


def read_true_false(value: object) -> object:
    """The text "true" / "false" as the boolean (SimpleTuner's configurator writes booleans as text);
    every other non-boolean ("yes", 1) is left for the strict boolean check to refuse."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return value


# A boolean key: true / false (or that text); anything else is refused by name.
Flag = Annotated[StrictBool, BeforeValidator(read_true_false)]
