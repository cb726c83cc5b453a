"""Captions for a media file: a sidecar .txt, the file name, or one prompt for the dataset."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from longcat_train.config.datasets import CaptionStrategy


@dataclass(frozen=True)
class Caption:
    """`text` is what trains ("" for none). `problem` explains a missing or empty caption
    (the item still trains, unconditionally); `unusable` means the item must be skipped."""

    text: str
    problem: str | None = None
    unusable: bool = False


def caption_path(media: Path) -> Path:
    return media.with_suffix(".txt")


def read_caption(
    media: Path, strategy: CaptionStrategy | None, instance_prompt: str | None = None, within: Path | None = None
) -> Caption:
    """The caption of `media`; with `within`, a caption file that is a link to a place outside that
    folder is unusable (a link to any file on the machine would otherwise be trained on)."""
    if strategy is None:
        return Caption("")
    if strategy == "instanceprompt":
        return Caption((instance_prompt or "").strip())
    if strategy == "filename":
        text = re.sub(r"\s+", " ", re.sub(r"[_-]", " ", media.stem)).strip()
        return Caption(text, problem=None if text else "file name gives an empty caption")
    if strategy == "textfile":
        sidecar = caption_path(media)
        if not sidecar.is_file():
            return Caption("", problem=f"caption file missing: {sidecar.name}")
        if within is not None and not sidecar.resolve().is_relative_to(within.resolve()):
            return Caption("", problem=f"caption {sidecar.name} is a link to {sidecar.resolve()}, outside the "
                           "dataset folder; set allow_links_outside: true to use it", unusable=True)
        try:
            text = sidecar.read_bytes().decode("utf-8-sig").strip()
        except UnicodeDecodeError as err:
            return Caption(
                "", problem=f"caption {sidecar.name} is not UTF-8 (byte {err.start}); re-save it as UTF-8",
                unusable=True,
            )
        return Caption(text, problem=None if text else f"caption file is empty: {sidecar.name}")
    raise ValueError(f"unknown caption_strategy {strategy!r}: use textfile, filename, instanceprompt or null")
