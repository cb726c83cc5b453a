"""Uploaded start frames and LoRA files: size-limited while they stream in, decoded before they are
kept (images with PIL as images only, re-saved as PNG; LoRAs parsed as safetensors LoRA files),
stored under names made from their content (never a name the client chose)."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import AsyncIterator
from pathlib import Path

from PIL import Image

from longcat_train.lora import read_lora

MAX_IMAGE_BYTES = 20 * 2**20
MAX_IMAGE_PIXELS = 40_000_000  # a decompression bomb is refused before its pixels are decoded
MAX_LORA_BYTES = 4 * 2**30  # a rank-128 LoRA of every linear is ~2.5 GB in fp32
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")


class UploadRefused(ValueError):
    pass


async def read_limited(chunks: AsyncIterator[bytes], limit: int, what: str) -> bytes:
    """The whole body, refused as soon as it passes `limit` bytes."""
    buffer = bytearray()
    async for chunk in chunks:
        buffer += chunk
        if len(buffer) > limit:
            raise UploadRefused(f"{what} is over {limit // 2**20} MiB")
    return bytes(buffer)


async def spool_limited(chunks: AsyncIterator[bytes], limit: int, target: Path, what: str) -> Path:
    """Stream the body into `target` (a temporary name), removed and refused past `limit` bytes."""
    size = 0
    try:
        with open(target, "wb") as handle:
            async for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise UploadRefused(f"{what} is over {limit // 2**20} MiB")
                handle.write(chunk)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return target


def store_image(data: bytes, folder: Path) -> Path:
    """Decode `data` as a PNG, JPEG or WebP image and keep it as `folder/image-<sha256>.png` (RGB)."""
    if not data:
        raise UploadRefused("the image upload is empty")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            kind, (width, height) = probe.format, probe.size
            probe.verify()  # structure and checksums, before any pixel is decoded
        if kind not in IMAGE_FORMATS:
            raise UploadRefused(f"the upload is a {kind} image; give a {', '.join(IMAGE_FORMATS)} file")
        if width * height > MAX_IMAGE_PIXELS:
            raise UploadRefused(f"the image is {width}x{height}, over {MAX_IMAGE_PIXELS} pixels")
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB")
    except UploadRefused:
        raise
    except Exception as error:  # PIL raises many types for files that are not images
        raise UploadRefused(f"the upload is not a readable image ({type(error).__name__}: {error})") from error
    encoded = io.BytesIO()
    rgb.save(encoded, format="PNG")
    path = folder / f"image-{hashlib.sha256(encoded.getvalue()).hexdigest()[:32]}.png"
    path.write_bytes(encoded.getvalue())
    return path


def store_lora(spooled: Path, folder: Path) -> Path:
    """Keep the spooled upload as `folder/lora-<sha256>.safetensors` if it reads as a LoRA file."""
    try:
        read_lora(spooled)
        with open(spooled, "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()[:32]
    except Exception as error:  # not safetensors, or not a LoRA: refused with the reader's reason
        spooled.unlink(missing_ok=True)
        raise UploadRefused(f"the upload is not a LoRA file we can read ({type(error).__name__}: {error})") from error
    path = folder / f"lora-{digest}.safetensors"
    os.replace(spooled, path)
    return path
