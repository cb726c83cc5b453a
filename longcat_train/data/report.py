"""`longcat data check`: what each dataset will contribute, without a GPU or a model."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal, Sequence

from rich.console import Console
from rich.table import Table

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
    dataset_id: str
    dataset_type: str
    disabled: bool = False
    error: str | None = None
    files_found: int = 0
    usable_files: int = 0
    items: int = 0  # including repeats and multiple windows
    skipped: list[SkippedFile] = field(default_factory=list)
    caption_warnings: list[SkippedFile] = field(default_factory=list)
    buckets: Counter[str] = field(default_factory=Counter)
    source_frames: list[int] = field(default_factory=list)
    source_fps: Counter[str] = field(default_factory=Counter)
    variable_frame_rate: int = 0
    is_i2v: bool = False
    paired: int = 0
    fallbacks: int = 0
    strict_pairing: bool = False
    cache_bytes: int = 0


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

    def render(self, console: Console) -> None:
        summary = Table(title="Datasets")
        for column in ("dataset", "type", "found", "usable", "items", "skipped", "pairing", "cache"):
            summary.add_column(column)
        for d in self.datasets:
            pairing = "-"
            if d.is_i2v:
                pairing = f"{d.paired} paired, {d.fallbacks} own first frame"
                if d.strict_pairing:
                    pairing = f"{d.paired} paired (strict: unmatched skipped)"
            summary.add_row(
                d.dataset_id, d.dataset_type + (" (disabled)" if d.disabled else ""), str(d.files_found),
                str(d.usable_files), str(d.items), str(len(d.skipped)), pairing, _human_bytes(d.cache_bytes),
            )
        console.print(summary)
        console.print(
            f"Estimated latent cache: {_human_bytes(self.total_cache_bytes)} "
            f"({self.cache_dtype}, posterior mean + std, clips and start frames)"
        )
        for d in self.datasets:
            if d.error:
                console.print(f"[red]{d.dataset_id}: {d.error}[/red]")
            if d.buckets:
                table = Table(title=f"{d.dataset_id}: buckets (WxH@frames)")
                table.add_column("bucket")
                table.add_column("items", justify="right")
                for label, count in sorted(d.buckets.items()):
                    table.add_row(label, str(count))
                console.print(table)
            if d.source_frames:
                console.print(
                    f"{d.dataset_id}: source frames min {min(d.source_frames)} / median "
                    f"{statistics.median(d.source_frames):g} / max {max(d.source_frames)}; fps "
                    + ", ".join(f"{fps} x{n}" for fps, n in d.source_fps.most_common())
                    + (f"; {d.variable_frame_rate} variable frame rate" if d.variable_frame_rate else "")
                )
            for title, rows, style in (("skipped", d.skipped, "red"), ("caption warnings", d.caption_warnings, "yellow")):
                if rows:
                    table = Table(title=f"{d.dataset_id}: {title}", title_style=style)
                    table.add_column("file")
                    table.add_column("reason")
                    for row in rows:
                        table.add_row(str(row.path), row.reason)
                    console.print(table)


def _human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


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
    specs: Sequence[DataSpec], seed: int = 0, cache_dtype: Literal["bf16", "fp32"] = "bf16"
) -> DataCheckReport:
    """Scan every dataset (no GPU, no model) and summarise what training would see.

    Dataset-level problems (missing directory, unknown conditioning id) are reported in the
    dataset's row instead of raised, so one run lists everything to fix.
    """
    by_id = {spec.id: spec for spec in specs}
    reports = []
    for spec in specs:
        report = DatasetReport(
            dataset_id=spec.id, dataset_type=spec.dataset_type, disabled=spec.disabled,
            is_i2v=spec.is_i2v and spec.is_video, strict_pairing=spec.strict_pairing,
        )
        try:
            if spec.disabled:
                pass
            elif spec.dataset_type == "conditioning":
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
