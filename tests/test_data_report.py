"""`data check`: per-dataset counts, reasons, buckets, pairing and cache-size estimate."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from longcat_train.data import DataSpec, data_check_report
from longcat_train.data.report import latent_cache_bytes

from .media_factory import write_clip, write_empty, write_image, write_vfr_clip


def test_latent_cache_size_formula() -> None:
    # 16 ch x (1 + 92/4 = 24) x 60 x 104 x 2 tensors x 2 bytes (bf16)
    assert latent_cache_bytes(480, 832, 93) == 16 * 24 * 60 * 104 * 2 * 2
    assert latent_cache_bytes(480, 832, 93, "fp32") == 2 * latent_cache_bytes(480, 832, 93)


def test_report_summarises_each_dataset(tmp_path: Path) -> None:
    clips, starts = tmp_path / "clips", tmp_path / "starts"
    write_clip(clips / "a.mp4", count=30, fps=30)
    write_clip(clips / "b.mp4", count=40, fps=24)
    write_vfr_clip(clips / "v.mp4", [i * 0.05 + (0.03 if i % 2 else 0) for i in range(20)])
    write_empty(clips / "zero.mp4")
    write_image(starts / "a.png")
    common = dict(resolution=32, alignment=16, num_frames=9, caption_strategy=None)
    specs = [
        DataSpec(id="clips", instance_data_dir=clips, is_i2v=True, conditioning_data=("starts",), repeats=1, **common),
        DataSpec(id="starts", instance_data_dir=starts, dataset_type="conditioning", **common),
        DataSpec(id="gone", instance_data_dir=tmp_path / "missing", **common),
    ]
    report = data_check_report(specs)
    clips_report, starts_report, gone = report.datasets
    assert clips_report.files_found == 4 and clips_report.usable_files == 3
    assert clips_report.items == 6  # repeats count
    assert [(s.path.name, "empty file" in s.reason) for s in clips_report.skipped] == [("zero.mp4", True)]
    assert dict(clips_report.buckets) == {"32x48x9": 6}
    assert sorted(clips_report.source_frames) == [20, 30, 40]
    assert clips_report.variable_frame_rate == 1
    assert clips_report.paired == 1 and clips_report.fallbacks == 2
    per_item = latent_cache_bytes(32, 48, 9) + latent_cache_bytes(32, 48, 1)
    assert clips_report.cache_bytes == 3 * per_item  # repeats share cache entries
    assert starts_report.usable_files == 1 and starts_report.items == 0
    assert gone.error and "missing" in gone.error
    assert report.total_cache_bytes == 3 * per_item

    out = io.StringIO()
    report.render(Console(file=out, width=200))
    text = out.getvalue()
    for expected in ("clips", "zero.mp4", "empty file", "32x48x9", "1 paired, 2 own first frame", "bf16", "not a directory"):
        assert expected in text


def test_a_start_frame_of_another_aspect_is_warned_about(tmp_path: Path) -> None:
    clips, starts = tmp_path / "clips", tmp_path / "starts"
    write_clip(clips / "wide.mp4", count=30, fps=30)  # 48x64
    write_clip(clips / "same.mp4", count=30, fps=30)
    write_image(starts / "wide.png", height=64, width=64)  # square: its sides get cropped
    write_image(starts / "same.png", height=96, width=128)  # same aspect, other size: fine
    common = dict(resolution=32, alignment=16, num_frames=9, caption_strategy=None)
    report = data_check_report([
        DataSpec(id="clips", instance_data_dir=clips, is_i2v=True, conditioning_data=("starts",), **common),
        DataSpec(id="starts", instance_data_dir=starts, dataset_type="conditioning", **common),
    ])
    warnings = report.datasets[0].aspect_warnings
    assert [(w.path.name, "64x64 start frame for a 48x64 clip" in w.reason) for w in warnings] == [("wide.png", True)]
    out = io.StringIO()
    report.render(Console(file=out, width=250))
    assert "start frames of another aspect" in out.getvalue() and "wide.png" in out.getvalue()
