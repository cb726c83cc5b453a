"""Which way up a render is: `validation_resolution` against the clips it is meant to look like.

`validation_resolution` is HEIGHTxWIDTH here and WIDTHxHEIGHT in SimpleTuner, so "832x480" is a
portrait render here and a landscape one there. Dataset-driven renders take the orientation of
their clip (`follow_orientation`); for the rest, `orientation_warning` says when the written
orientation contradicts the clips, naming both readings.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from longcat_train.config.problems import ConfigProblem

Orientation = Literal["landscape", "portrait", "square"]


def describe_size(height: int, width: int) -> str:
    """`832 wide × 480 high`: both axes named, so neither order can be misread."""
    return f"{width} wide × {height} high"


def orientation(height: int, width: int) -> Orientation:
    return "landscape" if width > height else "portrait" if height > width else "square"


def follow_orientation(size: tuple[int, int], like: tuple[int, int]) -> tuple[int, int]:
    """`size` (height, width), turned a quarter when `like` (height, width) lies the other way."""
    height, width = size
    ours, theirs = orientation(height, width), orientation(*like)
    return (width, height) if "square" not in (ours, theirs) and ours != theirs else size


def orientation_warning(
    resolution: str, size: tuple[int, int], reference: Sequence[tuple[int, int]], what: str, file: Path | str | None
) -> ConfigProblem | None:
    """A warning when `size` (the parsed `resolution`) lies the other way from most of the
    `reference` sizes (the held-out clips' or the training buckets', described by `what`)."""
    counts = Counter(orientation(h, w) for h, w in reference)
    counts.pop("square", None)
    written = orientation(*size)
    if not counts or written == "square":
        return None
    usual, _ = counts.most_common(1)[0]
    if usual == written:
        return None
    height, width = size
    example = next((h, w) for h, w in reference if orientation(h, w) == usual)
    return ConfigProblem(
        file, "validation_resolution", resolution,
        f"read here as HEIGHTxWIDTH, {describe_size(height, width)} ({written}), but {what} are {usual} "
        f"(e.g. {describe_size(*example)}); SimpleTuner would read it WIDTHxHEIGHT, {describe_size(width, height)}",
        f'write "{width}x{height}" for {usual} renders; renders of held-out clips follow each clip\'s orientation anyway',
        severity="warning",
    )
