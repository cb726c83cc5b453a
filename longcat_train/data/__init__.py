"""Datasets: decode clips, bucket them, pair start frames, caption, sample batches."""

from longcat_train.data.buckets import AspectBuckets, Bucket, Placement
from longcat_train.data.decode import (
    ClipDecodeError,
    ClipInfo,
    decode_frames,
    probe_clip,
    resample_timestamps,
    select_windows,
)
from longcat_train.data.items import ClipItem, DatasetError, DatasetScan, SkippedFile
from longcat_train.data.pixels import load_clip_pixels, load_start_frame_pixels
from longcat_train.data.report import DataCheckReport, data_check_report
from longcat_train.data.sampler import BucketBatchSampler
from longcat_train.data.scan import scan_dataset
from longcat_train.data.spec import DataSpec

__all__ = [
    "AspectBuckets",
    "Bucket",
    "BucketBatchSampler",
    "ClipDecodeError",
    "ClipInfo",
    "ClipItem",
    "DataCheckReport",
    "DataSpec",
    "DatasetError",
    "DatasetScan",
    "Placement",
    "SkippedFile",
    "data_check_report",
    "decode_frames",
    "load_clip_pixels",
    "load_start_frame_pixels",
    "probe_clip",
    "resample_timestamps",
    "scan_dataset",
    "select_windows",
]
