"""`longcat data check`: what each dataset will contribute, without a GPU or a model."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

from PIL import Image
from rich.console import Console
from rich.table import Column
from rich.text import Text

from longcat_train.config.problems import ValueTable
from longcat_train.data.decode import probe_clip
from longcat_train.data.items import DatasetError, DatasetScan, SkippedFile
from longcat_train.data.pairing import index_conditioning
from longcat_train.data.scan import scan_dataset
from longcat_train.data.spec import DataSpec
from longcat_train.release_facts import LATENT_CHANNELS, latent_shape

_BYTES = {"bf16": 2, "fp32": 4}


def latent_cache_bytes(height: int, width: int, frames: int, dtype: Literal["bf16", "fp32"] = "bf16") -> int:
    """Bytes of one cached entry: posterior mean and std (2 tensors) of the clip's latent shape."""
    return LATENT_CHANNELS * math.prod(latent_shape(frames, height, width)) * 2 * _BYTES[dtype]


@dataclass
class DatasetReport:
    """One dataset's part of `data check`. `trained`: a training dataset (not start frames, not the
    eval split), which `train` needs usable clips in. `caption_warnings`: kept files whose caption is
    missing or empty."""

    dataset_id: str
    dataset_type: str
    trained: bool = False
    disabled: bool = False
    error: str | None = None
    files_found: int = 0
    usable_files: int = 0
    items: int = 0  # including repeats and multiple windows
    skipped: list[SkippedFile] = field(default_factory=list)
    caption_warnings: list[SkippedFile] = field(default_factory=list)
    # start frames whose aspect differs from their clip's: cropped to the clip's framing, as told
    aspect_warnings: list[SkippedFile] = field(default_factory=list)
    buckets: Counter[str] = field(default_factory=Counter)
    source_frames: list[int] = field(default_factory=list)
    source_fps: Counter[str] = field(default_factory=Counter)
    variable_frame_rate: int = 0
    is_i2v: bool = False
    paired: int = 0
    fallbacks: int = 0
    strict_pairing: bool = False
    cache_bytes: int = 0

    def bucket_sizes(self) -> list[tuple[int, int]]:
        """(height, width) of each item's bucket (one entry per item, so the common size weighs most)."""
        sizes = []
        for label, count in self.buckets.items():
            height, width, _frames = (int(part) for part in label.split("x"))
            sizes += [(height, width)] * count
        return sizes

    @property
    def pairing(self) -> str:
        if not self.is_i2v:
            return "-"
        if self.strict_pairing:
            return f"{self.paired} paired (strict: unmatched skipped)"
        return f"{self.paired} paired, {self.fallbacks} own first frame"

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.dataset_id, "type": self.dataset_type, "trained": self.trained, "disabled": self.disabled,
            "error": self.error, "files_found": self.files_found, "usable_files": self.usable_files,
            "items": self.items, "captions_missing": len(self.caption_warnings),
            "skipped": [_file_json(f) for f in self.skipped],
            "caption_warnings": [_file_json(f) for f in self.caption_warnings],
            "start_frame_aspect_warnings": [_file_json(f) for f in self.aspect_warnings],
            "buckets": dict(sorted(self.buckets.items())),
            "source_frames": {"min": min(self.source_frames), "median": statistics.median(self.source_frames),
                              "max": max(self.source_frames)} if self.source_frames else None,
            "source_fps": dict(self.source_fps),
            "variable_frame_rate": self.variable_frame_rate,
            "pairing": {"i2v": self.is_i2v, "paired": self.paired, "own_first_frame": self.fallbacks,
                        "strict": self.strict_pairing},
            "cache_bytes": self.cache_bytes,
        }


def _file_json(skipped: SkippedFile) -> dict[str, str]:
    return {"path": str(skipped.path), "reason": skipped.reason}


@dataclass
class DataCheckReport:
    datasets: list[DatasetReport]
    cache_dtype: Literal["bf16", "fp32"] = "bf16"

    @property
    def total_cache_bytes(self) -> int:
        return sum(d.cache_bytes for d in self.datasets)

    @property
    def usable_items(self) -> int:
        return sum(d.items for d in self.datasets)

    @property
    def empty_training_datasets(self) -> list[str]:
        """Training datasets without a usable clip: `train` leaves them out, and stops when no
        training dataset has one."""
        return [d.dataset_id for d in self.datasets if d.trained and not d.items]

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": not self.empty_training_datasets,
            "empty_training_datasets": self.empty_training_datasets,
            "datasets": [d.as_json() for d in self.datasets],
            "cache_bytes": self.total_cache_bytes,
            "cache_dtype": self.cache_dtype,
        }

    def render(self, console: Console) -> None:
        summary = ValueTable(
            "dataset", "type", *(Column(name, justify="right") for name in ("found", "usable", "items", "skipped")),
            Column("no caption", justify="right"), "pairing", Column("cache", justify="right"), title="Datasets",
        )
        for d in self.datasets:
            summary.add_row(
                d.dataset_id, d.dataset_type + (" (disabled)" if d.disabled else ""), str(d.files_found),
                str(d.usable_files), str(d.items), str(len(d.skipped)), str(len(d.caption_warnings)), d.pairing,
                _human_bytes(d.cache_bytes),
            )
        console.print(summary)
        console.print(
            f"Estimated latent cache: {_human_bytes(self.total_cache_bytes)} "
            f"({self.cache_dtype}, posterior mean + std, clips and start frames)"
        )
        for d in self.datasets:
            if d.error:
                console.print(Text(f"{d.dataset_id}: {d.error}", style="red"))
            if d.buckets:
                table = ValueTable("bucket (HxWxF)", Column("items", justify="right"),
                                   title=f"{d.dataset_id}: buckets")
                for label, count in sorted(d.buckets.items()):
                    table.add_row(label, str(count))
                console.print(table)
            if d.source_frames:
                console.print(Text(
                    f"{d.dataset_id}: source frames min {min(d.source_frames)} / median "
                    f"{statistics.median(d.source_frames):g} / max {max(d.source_frames)}; fps "
                    + ", ".join(f"{fps} x{n}" for fps, n in d.source_fps.most_common())
                    + (f"; {d.variable_frame_rate} variable frame rate" if d.variable_frame_rate else "")
                ))
            for title, rows, style in (("skipped", d.skipped, "red"), ("caption warnings", d.caption_warnings, "yellow"),
                                       ("start frames of another aspect", d.aspect_warnings, "yellow")):
                if rows:
                    table = ValueTable("file", "reason", title=f"{d.dataset_id}: {title}", title_style=style)
                    for row in rows:
                        table.add_row(str(row.path), row.reason)
                    console.print(table)
        if self.empty_training_datasets:
            console.print(Text(
                f"no usable clips in training dataset(s) {', '.join(self.empty_training_datasets)} (why: above); "
                "`train` leaves them out, and stops when no training dataset has clips", style="bold red",
            ))


def _human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


ASPECT_TOLERANCE = 0.02  # relative: rounding of sizes, not a different framing


def _start_frame_aspect_warnings(items) -> list[SkippedFile]:
    """Paired start frames whose height/width ratio differs from their clip's source: they are
    resized and cropped like the clip's first frame, so part of the picture is cut away."""
    warnings = []
    for start in {item.start_frame: item for item in items if item.start_frame is not None}.values():
        with Image.open(start.start_frame) as image:
            width, height = image.size  # read from the header
        clip_height, clip_width = start.source_size
        if abs((height / width) / (clip_height / clip_width) - 1) > ASPECT_TOLERANCE:
            warnings.append(SkippedFile(start.start_frame, f"{height}x{width} start frame for a {clip_height}x"
                                        f"{clip_width} clip ({start.path.name}): cropped to the clip's framing"))
    return warnings


def _fill_from_scan(report: DatasetReport, scan: DatasetScan, dtype: Literal["bf16", "fp32"]) -> None:
    report.files_found = scan.files_found
    report.skipped = scan.skipped
    report.caption_warnings = scan.caption_warnings
    report.items = len(scan.items)
    report.paired = scan.paired
    report.fallbacks = len(scan.fallbacks)
    unique = {item.key: item for item in scan.items}  # repeats share one cache entry
    paths = {item.path for item in unique.values()}
    report.usable_files = len(paths)
    report.buckets = Counter(item.bucket.label for item in scan.items)
    report.aspect_warnings = _start_frame_aspect_warnings(unique.values())
    for path in sorted(paths):
        info = probe_clip(path)  # cached by the scan, so free
        report.source_frames.append(info.frame_count)
        report.source_fps[f"{info.average_fps:.2f}"] += 1
        report.variable_frame_rate += info.is_variable_frame_rate
    for item in unique.values():
        b = item.bucket
        report.cache_bytes += latent_cache_bytes(b.height, b.width, b.num_frames, dtype)
        if item.is_i2v:
            report.cache_bytes += latent_cache_bytes(b.height, b.width, 1, dtype)


def data_check_report(
    specs: Sequence[DataSpec], seed: int = 0, cache_dtype: Literal["bf16", "fp32"] = "bf16",
    trained: Collection[str] | None = None,
) -> DataCheckReport:
    """Scan every dataset (no GPU, no model) and summarise what training would see. `trained`: the
    ids of the training datasets (a config's `training_datasets`); None: every video and image one.

    Dataset-level problems (missing directory, unknown conditioning id) are reported in the
    dataset's row instead of raised, so one run lists everything to fix.
    """
    by_id = {spec.id: spec for spec in specs}
    if trained is None:
        trained = {spec.id for spec in specs if spec.kind.trained and not spec.disabled}
    reports = []
    for spec in specs:
        report = DatasetReport(
            dataset_id=spec.id, dataset_type=spec.dataset_type, disabled=spec.disabled,
            trained=spec.id in trained,
            is_i2v=spec.is_i2v and spec.kind.takes_start_frames, strict_pairing=spec.strict_pairing,
        )
        try:
            if spec.disabled:
                pass
            elif spec.kind.gives_start_frames:
                index, skipped = index_conditioning([spec])
                report.files_found = len(index) + len(skipped)
                report.usable_files = len(index)
                report.skipped = skipped
            else:
                _fill_from_scan(report, scan_dataset(spec, by_id, seed), cache_dtype)
        except DatasetError as err:
            report.error = str(err)
        reports.append(report)
    return DataCheckReport(datasets=reports, cache_dtype=cache_dtype)
