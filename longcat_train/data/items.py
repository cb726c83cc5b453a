"""What a dataset scan produces: training items, and the files it could not use (with why)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longcat_train.data.buckets import Bucket, Placement

# Bump when decoding, resampling, resizing or cropping changes what pixels an item produces:
# caches key on it, so old entries are never reused.
DATA_FORMAT_VERSION = 1


class DatasetError(ValueError):
    """A dataset that cannot be scanned at all (wrong directory, unknown conditioning id):
    a configuration problem to fix before training, unlike a bad file, which is skipped."""


@dataclass(frozen=True)
class SkippedFile:
    path: Path
    reason: str


# A file's content sample: its head and tail (where containers keep their headers and index)
# and evenly spread blocks in between. Hashing whole clips at every start would read the whole
# dataset; the sample catches a replaced file even when `cp -p` / `rsync -a` keep size and mtime.
_SAMPLE_EDGE_BYTES = 1 << 20
_SAMPLE_BLOCKS = 16
_SAMPLE_BLOCK_BYTES = 64 << 10


def content_sample_hash(path: Path, size: int) -> str:
    """Hex blake2b of the file's head, tail and evenly spread blocks (the whole file when small)."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        if size <= 2 * _SAMPLE_EDGE_BYTES + _SAMPLE_BLOCKS * _SAMPLE_BLOCK_BYTES:
            digest.update(handle.read())
            return digest.hexdigest()
        step = (size - 2 * _SAMPLE_EDGE_BYTES) // (_SAMPLE_BLOCKS + 1)
        spans = [(0, _SAMPLE_EDGE_BYTES), (size - _SAMPLE_EDGE_BYTES, _SAMPLE_EDGE_BYTES)]
        spans += [(_SAMPLE_EDGE_BYTES + step * (i + 1), _SAMPLE_BLOCK_BYTES) for i in range(_SAMPLE_BLOCKS)]
        for offset, length in spans:
            handle.seek(offset)
            digest.update(handle.read(length))
    return digest.hexdigest()


@dataclass(frozen=True)
class FileStamp:
    """Identity of a file's content: what the filesystem reports plus a hash of a content sample
    (`content_sample_hash`), so a same-size file copied in with its old mtime is still seen."""

    path: Path
    size: int
    mtime_ns: int
    content: str

    @classmethod
    def of(cls, path: Path) -> FileStamp:
        stat = path.stat()
        return cls(path=path, size=stat.st_size, mtime_ns=stat.st_mtime_ns,
                   content=content_sample_hash(path, stat.st_size))

    def as_dict(self) -> dict[str, Any]:
        return {"path": str(self.path.resolve()), "size": self.size, "mtime_ns": self.mtime_ns,
                "content": self.content}


def item_key(dataset_id: str, path: Path, window_index: int) -> str:
    """Stable id of one window of one file: the same in every run."""
    return f"{dataset_id}:{path}#{window_index}"


@dataclass(frozen=True)
class ClipItem:
    """Everything needed to reproduce one training sample's pixels, caption and conditioning.

    `frame_indices` are source frame indices (after fps resampling, repeats possible) of the
    window; `placement` resizes the upright `source_size` (height, width) and crops to `bucket`.
    `start_stamp` is the paired conditioning file, or None: an I2V item without a pair uses the
    clip's own first window frame.
    """

    dataset_id: str
    source: FileStamp
    caption: str
    bucket: Bucket
    frame_indices: tuple[int, ...]
    fps: float | str
    window_index: int
    source_size: tuple[int, int]
    placement: Placement
    is_i2v: bool = False
    start_stamp: FileStamp | None = None
    i2v_probability: float = 1.0
    caption_dropout_probability: float = 0.0

    @property
    def path(self) -> Path:
        return self.source.path

    @property
    def start_frame(self) -> Path | None:
        return self.start_stamp.path if self.start_stamp else None

    @property
    def crop(self) -> tuple[int, int, int, int]:
        return self.placement.crop

    @property
    def key(self) -> str:
        return item_key(self.dataset_id, self.path, self.window_index)

    def _geometry(self) -> dict[str, Any]:
        return {
            "format": DATA_FORMAT_VERSION,
            "bucket": [self.bucket.height, self.bucket.width, self.bucket.num_frames],
            "resize": list(self.placement.resize),
            "crop": list(self.placement.crop),
        }

    def fingerprint(self) -> dict[str, Any]:
        """The clip's identity for cache keys: source file and every decode parameter."""
        return {
            **self._geometry(),
            "source": self.source.as_dict(),
            "frames": list(self.frame_indices),
            "fps": self.fps,
        }

    def start_frame_fingerprint(self) -> dict[str, Any] | None:
        """The start frame's identity (None for T2V items): the paired file, or for a fallback
        the clip's first window frame."""
        if not self.is_i2v:
            return None
        if self.start_stamp is None:
            return {**self._geometry(), "fallback_from": self.source.as_dict(), "frame": self.frame_indices[0]}
        return {**self._geometry(), "source": self.start_stamp.as_dict(), "cover": list(self.source_size)}


@dataclass
class DatasetScan:
    """One dataset's scan. `items` include repeats; `fallbacks` are I2V clips without a paired
    start frame (they use their own first frame); `caption_warnings` are kept items whose
    caption is missing or empty (they train as unconditional samples)."""

    dataset_id: str
    files_found: int = 0
    items: list[ClipItem] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    fallbacks: list[Path] = field(default_factory=list)
    caption_warnings: list[SkippedFile] = field(default_factory=list)
    paired: int = 0
