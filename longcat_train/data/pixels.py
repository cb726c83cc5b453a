"""Pixels of an item: decode its window, resize to cover the bucket, crop, scale to [-1, 1]."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from longcat_train.data.buckets import Bucket, Placement, place
from longcat_train.data.decode import decode_frames
from longcat_train.data.items import ClipItem


def _resize_and_crop(frames: torch.Tensor, placement: Placement) -> torch.Tensor:
    """frames: float [F, 3, h, w] in 0..255 -> [F, 3, crop_h, crop_w]."""
    if tuple(frames.shape[-2:]) != placement.resize:
        # antialias keeps downscaled training frames free of aliasing (like a proper image resize)
        frames = F.interpolate(frames, size=placement.resize, mode="bilinear", antialias=True, align_corners=False)
    top, left, height, width = placement.crop
    return frames[:, :, top : top + height, left : left + width]


def _as_tensor(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float()


def _to_model_range(frames: torch.Tensor) -> torch.Tensor:
    """[F, 3, H, W] 0..255 -> [3, F, H, W] float32 in [-1, 1]."""
    return (frames.clamp(0, 255) / 127.5 - 1.0).permute(1, 0, 2, 3).contiguous()


def load_clip_pixels(item: ClipItem) -> torch.Tensor:
    """The item's window as float32 [3, F, H, W] in [-1, 1] at its bucket size."""
    frames = _as_tensor(decode_frames(item.path, item.frame_indices))
    return _to_model_range(_resize_and_crop(frames, item.placement))


def load_start_frame_pixels(item: ClipItem) -> torch.Tensor:
    """The item's start frame as float32 [3, 1, H, W] in [-1, 1], aligned with the clip's first frame.

    A paired file of another size than the clip is first resized to cover the clip's upright
    source size and centre-cropped to it; then the clip's own resize and crop apply. So a start
    image at the clip's size (the usual case) is treated exactly like the clip's first frame, and
    one of the same aspect at another resolution lines up with it too. Without a paired file the
    clip's first window frame is used.
    """
    if item.start_frame is None:
        frame = _as_tensor(decode_frames(item.path, item.frame_indices[:1]))
    else:
        frame = _as_tensor(decode_frames(item.start_frame, [0]))
        src_h, src_w = item.source_size
        if tuple(frame.shape[-2:]) != (src_h, src_w):
            cover = place(tuple(frame.shape[-2:]), Bucket(src_h, src_w, 1), True, "center", 0.0)
            frame = _resize_and_crop(frame, cover)
    return _to_model_range(_resize_and_crop(frame, item.placement))
