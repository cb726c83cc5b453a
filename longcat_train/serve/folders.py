"""What `serve` may read and write: the run's `output_dir` only. Requests name files by paths
relative to it, checked here (no absolute paths, no `..`, no symlink out); uploads and renders go
under `output_dir/serve/`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from longcat_train.training.checkpoint import CHECKPOINT_RE, LORA_FILE, list_checkpoints

STEP_FOLDER = re.compile(r"^step_(\d+)$")


class PathRefused(ValueError):
    """A request named a path outside the run's folders (or one that does not exist)."""


@dataclass(frozen=True)
class LoraChoice:
    path: str  # relative to output_dir: what the page sends back
    label: str


@dataclass(frozen=True)
class RunFolders:
    output_dir: Path

    @classmethod
    def create(cls, output_dir: Path) -> RunFolders:
        folders = cls(Path(output_dir).resolve())
        for folder in (folders.uploads, folders.renders):
            folder.mkdir(parents=True, exist_ok=True)
        return folders

    @property
    def uploads(self) -> Path:
        return self.output_dir / "serve" / "uploads"

    @property
    def renders(self) -> Path:
        return self.output_dir / "serve" / "renders"

    def relative(self, path: Path) -> str:
        """`path` (below `output_dir` by name) as the page names it; `inside` checks where it leads."""
        return Path(path).relative_to(self.output_dir).as_posix()

    def inside(self, relative: str, under: Path | None = None) -> Path:
        """The existing file `relative` (a POSIX path under `output_dir`) names, inside `under`
        (default `output_dir`) once symlinks are resolved; `PathRefused` otherwise."""
        root = (under or self.output_dir).resolve()
        parts = PurePosixPath(relative).parts
        if not relative or "\\" in relative or "\0" in relative or PurePosixPath(relative).is_absolute() or ".." in parts:
            raise PathRefused(f"{relative!r} is not a path inside the run's folder")
        path = (self.output_dir / relative).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise PathRefused(f"{relative!r} is not a file inside {root}")
        return path

    def loras(self) -> list[LoraChoice]:
        """The run's LoRAs: each checkpoint's (by step), the final `lora.safetensors`, then uploads."""
        choices = []
        for checkpoint in list_checkpoints(self.output_dir):
            match = CHECKPOINT_RE.match(checkpoint.name)
            if match and (checkpoint / LORA_FILE).is_file():
                choices.append(LoraChoice(f"{checkpoint.name}/{LORA_FILE}", f"step {match.group(1)}"))
        if (self.output_dir / LORA_FILE).is_file():
            choices.append(LoraChoice(LORA_FILE, "final"))
        for upload in sorted(self.uploads.glob("*.safetensors")):
            choices.append(LoraChoice(self.relative(upload), f"uploaded {upload.name[:16]}"))
        return choices

    def validation_renders(self) -> list[dict]:
        """Periodic validation renders by step: `[{"step": 100, "videos": [...], "sheets": [...]}]`."""
        found = []
        for folder in (self.output_dir / "validation").glob("step_*"):
            match = STEP_FOLDER.match(folder.name)
            if match and folder.is_dir():
                found.append({
                    "step": int(match.group(1)),
                    "videos": [self.relative(p) for p in sorted(folder.glob("*.mp4"))],
                    "sheets": [self.relative(p) for p in sorted(folder.glob("*.png"))],
                })
        return sorted(found, key=lambda entry: entry["step"])
