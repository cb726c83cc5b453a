"""Start frames for image-to-video clips: conditioning files matched by file stem."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from longcat_train.data.decode import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, ClipDecodeError, probe_clip
from longcat_train.data.items import DatasetError, FileStamp, SkippedFile
from longcat_train.data.spec import DataSpec


def list_media(directory: Path, extensions: frozenset[str]) -> list[Path]:
    """Files under `directory` (recursively, sorted, hidden entries excluded) with a media extension."""
    if not directory.is_dir():
        raise DatasetError(f"instance_data_dir {directory} is not a directory; fix the path in the dataset config")
    return sorted(
        path
        for path in directory.rglob("*")
        if path.is_file()
        and path.suffix.lower() in extensions
        and not any(part.startswith(".") for part in path.relative_to(directory).parts)
    )


def index_conditioning(specs: Sequence[DataSpec]) -> tuple[dict[str, FileStamp], list[SkippedFile]]:
    """Map file stem -> start-frame file over conditioning datasets (images, or videos whose
    first frame is used). Unreadable files and later duplicates of a stem are returned as
    skipped; the first file in dataset order, then path order, wins a stem."""
    index: dict[str, FileStamp] = {}
    skipped: list[SkippedFile] = []
    for spec in specs:
        for path in list_media(spec.instance_data_dir, IMAGE_EXTENSIONS | VIDEO_EXTENSIONS):
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
