"""Start frames for image-to-video clips: conditioning files matched by file stem."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from longcat_train.data.decode import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, ClipDecodeError, probe_clip
from longcat_train.data.items import DatasetError, FileStamp, SkippedFile
from longcat_train.data.spec import DataSpec


def list_media(
    directory: Path, extensions: frozenset[str], allow_links_outside: bool = False
) -> tuple[list[Path], list[SkippedFile]]:
    """Files under `directory` (recursively, sorted, hidden entries excluded) with a media
    extension, and the entries passed over: links (to files or folders) that lead outside
    `directory` unless `allow_links_outside`. Linked folders inside are followed, each real
    folder once (a link loop ends there)."""
    if not directory.is_dir():
        raise DatasetError(f"instance_data_dir {directory} is not a directory; fix the path in the dataset config")
    root = directory.resolve()
    outside = "a link to {target}, outside the dataset folder; set allow_links_outside: true to use it"
    found: list[Path] = []
    skipped: list[SkippedFile] = []
    visited = {root}
    pending = [directory]
    while pending:
        folder = pending.pop()
        for entry in sorted(folder.iterdir()):
            if entry.name.startswith("."):
                continue
            target = entry.resolve()
            if entry.is_symlink() and not allow_links_outside and not target.is_relative_to(root):
                if entry.is_dir() or entry.suffix.lower() in extensions:
                    skipped.append(SkippedFile(entry, outside.format(target=target)))
                continue
            if entry.is_dir():
                if target not in visited:
                    visited.add(target)
                    pending.append(entry)
            elif entry.is_file() and entry.suffix.lower() in extensions:
                found.append(entry)
    return sorted(found), sorted(skipped, key=lambda skip: skip.path)


def index_conditioning(specs: Sequence[DataSpec]) -> tuple[dict[str, FileStamp], list[SkippedFile]]:
    """Map file stem -> start-frame file over conditioning datasets (images, or videos whose
    first frame is used). Unreadable files and later duplicates of a stem are returned as
    skipped; the first file in dataset order, then path order, wins a stem."""
    index: dict[str, FileStamp] = {}
    skipped: list[SkippedFile] = []
    for spec in specs:
        paths, passed_over = list_media(spec.instance_data_dir, IMAGE_EXTENSIONS | VIDEO_EXTENSIONS,
                                        spec.allow_links_outside)
        skipped.extend(passed_over)
        for path in paths:
            if path.stem in index:
                skipped.append(SkippedFile(path, f"duplicate stem '{path.stem}': {index[path.stem].path} is used"))
                continue
            try:
                probe_clip(path)
                index[path.stem] = FileStamp.of(path)
            except ClipDecodeError as err:
                skipped.append(SkippedFile(path, err.reason))
    return index, skipped


def conditioning_specs_for(spec: DataSpec, available: Mapping[str, DataSpec]) -> list[DataSpec]:
    missing = [name for name in spec.conditioning_data if name not in available]
    if missing:
        raise DatasetError(
            f"dataset '{spec.id}': conditioning_data names unknown dataset(s) {missing}; "
            f"known ids: {sorted(available)}"
        )
    return [available[name] for name in spec.conditioning_data]
