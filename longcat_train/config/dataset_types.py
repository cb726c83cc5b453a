"""The dataset types of `multidatabackend.json` and what each one is, in one table.

Every part that treats datasets differently by type (config checks, the startup summary, the scan,
`data check`, caching, validation) asks a row of `DATASET_TYPES` a question instead of comparing
names, so a new type is one row here. Torch-free: `config check` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class DatasetKind:
    """What a dataset type's files are and what training does with them."""

    trained: bool  # its items are training samples (and it can be the eval split)
    moving: bool  # clips over time (frames, fps windows); otherwise each file is one frame
    takes_start_frames: bool  # image-to-video: its items may be conditioned on a start frame
    gives_start_frames: bool  # its files are start frames for other datasets' clips, matched by stem
    media: Literal["video", "image", "any"]  # the files its scan accepts
    role: str  # what `config check` calls it


DATASET_TYPES: dict[str, DatasetKind] = {
    "video": DatasetKind(trained=True, moving=True, takes_start_frames=True, gives_start_frames=False,
                         media="video", role="train"),
    "image": DatasetKind(trained=True, moving=False, takes_start_frames=False, gives_start_frames=False,
                         media="image", role="train"),
    "conditioning": DatasetKind(trained=False, moving=False, takes_start_frames=False, gives_start_frames=True,
                                media="any", role="start frames"),
}

DatasetType = Literal[tuple(DATASET_TYPES)]  # type: ignore[valid-type]  # the table's names, for pydantic


# What a name the table lacks is (a typo the config checks report): nothing at all.
UNKNOWN = DatasetKind(trained=False, moving=False, takes_start_frames=False, gives_start_frames=False,
                      media="any", role="unknown")


def kind_of(dataset_type: object) -> DatasetKind:
    """The row of a type name as written in a file (`UNKNOWN` for a name the table lacks)."""
    return DATASET_TYPES.get(dataset_type, UNKNOWN) if isinstance(dataset_type, str) else UNKNOWN


def names_where(question: str) -> str:
    """The type names whose row answers `question` (a field of `DatasetKind`) with true, for messages."""
    return " or ".join(f'"{name}"' for name, kind in DATASET_TYPES.items() if getattr(kind, question))
