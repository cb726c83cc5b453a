"""One dataset directory -> training items (clip, window, caption, start frame, bucket).

A bad file never stops a scan: it lands in `DatasetScan.skipped` with the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from longcat_train.config.dataset_types import DATASET_TYPES
from longcat_train.data.buckets import MAX_ASPECT_RATIO, AspectBuckets, Bucket, frames_for, place
from longcat_train.data.captions import read_caption
from longcat_train.data.decode import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    ClipDecodeError,
    ClipInfo,
    probe_clip,
    resample_timestamps,
    seeded_rng,
    select_windows,
)
from longcat_train.data.items import ClipItem, DatasetScan, FileStamp, SkippedFile, item_key
from longcat_train.data.pairing import conditioning_specs_for, index_conditioning, list_media
from longcat_train.data.spec import DataSpec


class _Skip(Exception):
    """Internal: this file is skipped for `reason`."""


def buckets_for(spec: DataSpec) -> AspectBuckets:
    return AspectBuckets(spec.resolution, spec.resolution_type, spec.alignment, spec.crop_aspect)


def _check_shape(info: ClipInfo, target: tuple[int, int], spec: DataSpec) -> None:
    short, long = sorted((info.height, info.width))
    if long / short > MAX_ASPECT_RATIO:
        raise _Skip(f"extreme aspect ratio {info.width}x{info.height} (over {MAX_ASPECT_RATIO:g}:1)")
    upscale = max(target[0] / info.height, target[1] / info.width)
    if upscale > spec.max_upscale:
        raise _Skip(
            f"frames too small: {info.width}x{info.height} needs {upscale:.1f}x upscaling for bucket "
            f"{target[1]}x{target[0]} (max_upscale {spec.max_upscale:g}); lower resolution or drop the file"
        )


def _frame_count_reason(info: ClipInfo, available: int, spec: DataSpec) -> str:
    rate = "source fps" if spec.fps == "source" else f"{spec.fps:g} fps"
    frames = f"{info.frame_count} decoded frames give {available} frames at {rate}"
    if spec.max_frames is not None and available > spec.max_frames:
        return f"too long: {frames}, over max_frames {spec.max_frames}"
    needs = [f"min_frames {spec.effective_min_frames}"]
    if spec.bucket_strategy == "aspect_ratio":
        needs.insert(0, f"num_frames {spec.num_frames}")
    return f"too short: {frames}, the dataset needs at least {' and '.join(needs)}"


def _items_for_file(
    path: Path, spec: DataSpec, seed: int, start_frames: Mapping[str, FileStamp], scan: DatasetScan
) -> list[ClipItem]:
    caption = read_caption(path, spec.caption_strategy, spec.instance_prompt,
                           None if spec.allow_links_outside else spec.instance_data_dir)
    if caption.unusable:
        raise _Skip(caption.problem or "caption unusable")
    try:
        info = probe_clip(path)
    except ClipDecodeError as err:
        raise _Skip(err.reason) from None
    if spec.kind.media not in ("any", "image" if info.is_image else "video"):
        held = "image" if info.is_image else "video"
        homes = " or ".join(n for n, k in DATASET_TYPES.items() if k.trained and k.media == held)
        article = "an" if spec.dataset_type[0] in "aeiou" else "a"
        raise _Skip(f"{'an image' if info.is_image else 'a video'} in {article} {spec.dataset_type} dataset "
                    f"(put it in a dataset_type: {homes} dataset)")
    target = buckets_for(spec).target_size(info.height, info.width)
    _check_shape(info, target, spec)
    timeline = resample_timestamps(info, spec.fps)
    num_frames = frames_for(len(timeline), spec)
    if num_frames is None:
        raise _Skip(_frame_count_reason(info, len(timeline), spec))
    windows = select_windows(timeline, num_frames, spec.frame_window, seed, key=str(path))
    start = None
    is_i2v = spec.is_i2v and spec.kind.takes_start_frames
    if is_i2v:
        start = start_frames.get(path.stem)
        if start is None and spec.strict_pairing:
            raise _Skip(
                f"no start frame named '{path.stem}.*' in conditioning datasets {list(spec.conditioning_data)} "
                "(strict_pairing is on)"
            )
    bucket = Bucket(target[0], target[1], num_frames)
    stamp = FileStamp.of(path)
    items = []
    for window_index, window in enumerate(windows):
        items.append(
            ClipItem(
                dataset_id=spec.id,
                source=stamp,
                caption=caption.text,
                bucket=bucket,
                frame_indices=window,
                fps=spec.fps,
                window_index=window_index,
                source_size=(info.height, info.width),
                placement=place(
                    (info.height, info.width), bucket, spec.crop, spec.crop_style,
                    seeded_rng(seed, item_key(spec.id, path, window_index)).random(),
                ),
                is_i2v=is_i2v,
                start_stamp=start,
                i2v_probability=spec.i2v_probability,
                caption_dropout_probability=spec.caption_dropout_probability,
            )
        )
    if caption.problem:
        scan.caption_warnings.append(SkippedFile(path, caption.problem))
    if is_i2v:
        if start is None:
            scan.fallbacks.append(path)
        else:
            scan.paired += 1
    return items


def scan_dataset(
    spec: DataSpec, conditioning_specs: Mapping[str, DataSpec] | None = None, seed: int = 0
) -> DatasetScan:
    """Scan `spec.instance_data_dir` into items (each repeated `1 + repeats` times).

    Pairing: an I2V clip takes the file with the same stem from its `conditioning_data`
    datasets (looked up in `conditioning_specs` by id). Without a match the clip falls back to
    its own first window frame and is listed in `fallbacks`; with `strict_pairing` it is skipped
    instead, with the reason (so `data check` lists every unmatched clip at once and training
    proceeds with the paired ones). A dataset in which no usable file has a caption is refused
    (every file skipped) unless `allow_missing_captions`.

    Raises `DatasetError` only for a dataset-level problem (missing directory, unknown
    conditioning id). Conditioning datasets yield no items of their own.
    """
    scan = DatasetScan(dataset_id=spec.id)
    if spec.disabled or not spec.kind.trained:
        return scan
    start_frames: dict[str, FileStamp] = {}
    if spec.is_i2v and spec.kind.takes_start_frames:
        start_frames, _ = index_conditioning(conditioning_specs_for(spec, conditioning_specs or {}))
    files, scan.skipped = list_media(spec.instance_data_dir, VIDEO_EXTENSIONS | IMAGE_EXTENSIONS,
                                     spec.allow_links_outside)
    scan.files_found = len(files) + len(scan.skipped)
    for path in files:
        try:
            items = _items_for_file(path, spec, seed, start_frames, scan)
        except _Skip as skip:
            scan.skipped.append(SkippedFile(path, str(skip)))
            continue
        except Exception as err:  # noqa: BLE001 - one odd file must not stop a scan; it is reported
            scan.skipped.append(SkippedFile(path, f"unexpected error: {type(err).__name__}: {err}"))
            continue
        scan.items.extend(item for item in items for _ in range(1 + spec.repeats))
    if not spec.allow_missing_captions:
        _refuse_if_uncaptioned(scan)
    return scan


def _refuse_if_uncaptioned(scan: DatasetScan) -> None:
    """Skip every file, with why, when no usable file has a caption (each kept file whose caption is
    missing or empty has one caption warning). That is almost always a mistake (captions elsewhere,
    the wrong caption_strategy), and trained, the LoRA would learn to ignore the prompt."""
    if not scan.items or len(scan.caption_warnings) < len({item.path for item in scan.items}):
        return
    scan.skipped.extend(
        SkippedFile(w.path, f"{w.reason}, as for every usable file of this dataset (refused; "
                            "allow_missing_captions: true trains them without captions)")
        for w in scan.caption_warnings
    )
    scan.skipped.sort(key=lambda skipped: skipped.path)
    scan.items, scan.caption_warnings, scan.fallbacks, scan.paired = [], [], [], 0
