"""The packaged example configs that `longcat config init DIR` writes for the user to edit."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

ExampleKind = Literal["i2v", "t2v"]
# Packaged file -> name written into the target directory.
_EXAMPLES: dict[ExampleKind, dict[str, str]] = {
    "i2v": {"config.json.example": "config.json", "multidatabackend.json.example": "multidatabackend.json"},
    "t2v": {"config.t2v.json.example": "config.json", "multidatabackend.t2v.json.example": "multidatabackend.json"},
}


class ExistingFilesError(FileExistsError):
    """`config init` would overwrite files; nothing was written."""

    def __init__(self, paths: list[Path]) -> None:
        super().__init__(", ".join(str(p) for p in paths))
        self.paths = paths


def example_text(name: str) -> str:
    return resources.files("longcat_train").joinpath("examples", name).read_text(encoding="utf-8")


def write_example_configs(directory: Path, kind: ExampleKind = "i2v", force: bool = False) -> list[Path]:
    """Write config.json and multidatabackend.json into `directory` (created if needed).

    Refuses (writing nothing) when either file exists, unless `force`.
    """
    targets = {directory / target: source for source, target in _EXAMPLES[kind].items()}
    existing = [path for path in targets if path.exists()]
    if existing and not force:
        raise ExistingFilesError(existing)
    directory.mkdir(parents=True, exist_ok=True)
    for path, source in targets.items():
        path.write_text(example_text(source), encoding="utf-8")
    return list(targets)
