"""VAE latent cache: the normalised posterior (mean and std) of each clip and start frame.

Storing the posterior rather than one sample lets training draw a fresh latent every epoch.
An entry's key hashes the caller's fingerprint (source file and every decode parameter), the
VAE's identity, the tiling choice and a format version, so anything that changes the pixels or
the encoder gives a new key and a stale entry is never read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import AutoencoderKLWan

from longcat_train.cache.keys import (
    CacheEntryCorrupt,
    canonical_json,
    module_identity,
    read_safetensors_verified,
    stable_hash,
    write_safetensors_atomic,
)
from longcat_train.cache.summary import CacheSummary, Outcome, cache_progress
from longcat_train.components import vae_latent_stats

# Bump when what an entry holds or how it is computed changes; old entries then miss.
LATENT_FORMAT_VERSION = 1

LatentKind = Literal["clip", "start_frame"]
_KIND_DIRECTORIES: dict[str, str] = {"clip": "clips", "start_frame": "start_frames"}
_TENSORS = ("mean", "std")

logger = logging.getLogger(__name__)


class LatentCacheMiss(LookupError):
    """An entry is needed but absent or corrupt, and this cache has no VAE to encode it."""


@dataclass(frozen=True)
class CachedLatent:
    """Normalised posterior of one item, each `[16, T_lat, H/8, W/8]` float32:
    `mean = (μ − latents_mean) / latents_std`, `std = σ / latents_std`."""

    mean: torch.Tensor
    std: torch.Tensor
    meta: dict[str, Any]

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One normalised latent `mean + std·ε`, ε drawn from `generator`."""
        noise = torch.randn(
            self.mean.shape, generator=generator, dtype=self.mean.dtype, device=self.mean.device
        )
        return self.mean + self.std * noise


@dataclass(frozen=True)
class LatentJob:
    """One item to cache. `pixels_fn` is only called when the entry must be (re)encoded."""

    fingerprint: Mapping[str, Any]
    pixels_fn: Callable[[], torch.Tensor]
    kind: LatentKind = "clip"
    label: str = ""


def _check_pixels(pixels: torch.Tensor, temporal_factor: int, spatial_factor: int) -> None:
    # The causal VAE silently drops frames beyond 1 + k·4 and pixels outside [-1, 1] encode to
    # garbage latents, so a loader mistake is refused here rather than cached.
    if pixels.dim() != 4 or pixels.shape[0] != 3:
        raise ValueError(f"pixels must be [3, F, H, W] in [-1, 1], got shape {list(pixels.shape)}")
    frames, height, width = pixels.shape[1:]
    if (frames - 1) % temporal_factor != 0:
        raise ValueError(f"{frames} frames: the VAE needs 1 + {temporal_factor}·k frames")
    if height % spatial_factor or width % spatial_factor:
        raise ValueError(f"frame size {height}x{width}: height and width must be multiples of {spatial_factor}")
    low, high = pixels.min().item(), pixels.max().item()
    if low < -1.01 or high > 1.01:
        raise ValueError(f"pixels range from {low:.3g} to {high:.3g}; they must be scaled to [-1, 1]")


class LatentCache:
    """Content-keyed latent cache under `cache_dir` (`clips/` and `start_frames/` inside).

    `device` / `dtype`, when given, move the VAE there; latents are stored in float32 either way.
    With `vae=None` the cache only reads: pass the `identity` a cache built with the VAE reported
    (its `.identity`), e.g. after the VAE was unloaded for training.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        vae: AutoencoderKLWan | None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        tiling: bool = False,
        slicing: bool = False,
        identity: str | None = None,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.vae = vae
        if vae is None:
            if identity is None:
                raise ValueError("LatentCache without a VAE needs the `identity` of the cache that wrote it")
            self.identity = identity
            return
        if device is not None or dtype is not None:
            vae.to(device=device, dtype=dtype)
        parameter = next(vae.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        vae.eval()
        self.temporal_factor = int(vae.config.scale_factor_temporal)
        self.spatial_factor = int(vae.config.scale_factor_spatial)
        # Set both ways: the VAE may come from a cache that enabled them, and the identity
        # below must describe how this cache encodes.
        vae.enable_tiling() if tiling else vae.disable_tiling()
        vae.enable_slicing() if slicing else vae.disable_slicing()
        self.latents_mean, self.latents_std = vae_latent_stats(vae)
        # Tiling changes the numbers slightly, so it is part of what an entry depends on.
        self.identity = stable_hash({"vae": module_identity(vae), "tiling": tiling})

    def key(self, fingerprint: Mapping[str, Any], kind: LatentKind = "clip") -> str:
        return stable_hash(
            {"format": LATENT_FORMAT_VERSION, "kind": kind, "fingerprint": fingerprint, "vae": self.identity}
        )

    def path_for(self, fingerprint: Mapping[str, Any], kind: LatentKind = "clip") -> Path:
        return self.cache_dir / _KIND_DIRECTORIES[kind] / f"{self.key(fingerprint, kind)}.safetensors"

    def _expected_metadata(self, fingerprint: Mapping[str, Any], kind: LatentKind) -> dict[str, str]:
        return {
            "format": str(LATENT_FORMAT_VERSION),
            "key": self.key(fingerprint, kind),
            "kind": kind,
            "vae": self.identity,
            "fingerprint": canonical_json(fingerprint),
        }

    def _read(self, path: Path, expected: dict[str, str]) -> CachedLatent:
        tensors, metadata = read_safetensors_verified(path, expected, _TENSORS)
        mean, std = tensors["mean"], tensors["std"]
        if mean.shape != std.shape or mean.dim() != 4 or metadata.get("shape") != canonical_json(list(mean.shape)):
            raise CacheEntryCorrupt(
                path, f"mean {list(mean.shape)} / std {list(std.shape)} disagree with metadata {metadata.get('shape')}"
            )
        return CachedLatent(mean=mean, std=std, meta=metadata)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised posterior `(mean, std)` of `pixels` `[3, F, H, W]` in [-1, 1], float32 on CPU."""
        if self.vae is None:
            raise LatentCacheMiss("this LatentCache has no VAE to encode with")
        _check_pixels(pixels, self.temporal_factor, self.spatial_factor)
        batch = pixels.to(device=self.device, dtype=self.dtype).unsqueeze(0)
        posterior = self.vae.encode(batch).latent_dist
        stats_shape = (-1, 1, 1, 1)
        mean_shift = self.latents_mean.to(self.device).view(stats_shape)
        scale = self.latents_std.to(self.device).view(stats_shape)
        mean = (posterior.mean[0].float() - mean_shift) / scale
        std = posterior.std[0].float() / scale
        return mean.cpu(), std.cpu()

    def get_or_encode(
        self, fingerprint: Mapping[str, Any], pixels_fn: Callable[[], torch.Tensor], kind: LatentKind = "clip"
    ) -> CachedLatent:
        """The entry for `fingerprint`, read and fully verified if present, else (re)encoded from
        `pixels_fn()` and written. A corrupt entry is rebuilt and logged as a warning."""
        return self._get_or_encode(fingerprint, pixels_fn, kind)[0]

    def _get_or_encode(
        self, fingerprint: Mapping[str, Any], pixels_fn: Callable[[], torch.Tensor], kind: LatentKind
    ) -> tuple[CachedLatent, Outcome, str]:
        path = self.path_for(fingerprint, kind)
        expected = self._expected_metadata(fingerprint, kind)
        outcome, reason = Outcome.ENCODED, ""
        if path.exists():
            try:
                return self._read(path, expected), Outcome.REUSED, ""
            except CacheEntryCorrupt as corrupt:
                outcome, reason = Outcome.REBUILT, corrupt.reason
                logger.warning("latent cache entry %s is corrupt (%s); encoding it again", path, reason)
        if self.vae is None:
            state = f"corrupt ({reason})" if reason else "missing"
            raise LatentCacheMiss(f"latent cache entry {path} is {state}. Fix: run `longcat cache` first.")
        mean, std = self.encode(pixels_fn())
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            raise ValueError("the VAE produced NaN or inf latents; try dtype float32 or bfloat16 instead of float16")
        metadata = {**expected, "shape": canonical_json(list(mean.shape))}
        write_safetensors_atomic(path, {"mean": mean, "std": std}, metadata)
        return CachedLatent(mean=mean, std=std, meta=metadata), outcome, reason

    def encode_many(self, jobs: Iterable[LatentJob], progress: bool = True) -> CacheSummary:
        """Make sure every job has a valid entry; a job that fails (bad clip, VAE error) is recorded
        with its reason and the rest proceed. Existing entries are read and verified in full
        (checksum of the bytes, finite values), so a damaged entry is rebuilt here, not found
        when training first draws it."""
        job_list = list(jobs)
        summary = CacheSummary(name="latent")
        with cache_progress(progress) as bar:
            task = bar.add_task("VAE latents", total=len(job_list))
            for job in job_list:
                label = job.label or canonical_json(job.fingerprint)
                try:
                    _, outcome, reason = self._get_or_encode(job.fingerprint, job.pixels_fn, job.kind)
                    summary.record(outcome, label, reason)
                except Exception as error:  # one bad item never stops the pass; it is reported
                    summary.record_failure(label, error)
                bar.advance(task)
        return summary

