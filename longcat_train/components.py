"""Load LongCat-Video's frozen components from a local checkpoint in the official layout.

Everything loads with `local_files_only=True`: a trainer must never reach the network, and a
missing file is reported with the folder that should hold it.
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
from transformers import AutoTokenizer, PreTrainedTokenizerBase, UMT5EncoderModel

from .config.model_paths import MODEL_MARKERS as _REQUIRED_FILES
from .config.model_paths import is_umt5_config
from .release_facts import LATENT_CHANNELS

SUBFOLDERS: tuple[str, ...] = tuple(_REQUIRED_FILES)


class CheckpointError(ValueError):
    """The checkpoint directory is missing something or holds the wrong component."""


@dataclass(frozen=True)
class ModelLayout:
    """The official LongCat-Video directory: dit/, vae/, text_encoder/, tokenizer/, scheduler/."""

    root: Path

    def __post_init__(self) -> None:
        # Accept a str too; frozen dataclasses need object.__setattr__ for this.
        object.__setattr__(self, "root", Path(self.root).expanduser())

    @property
    def dit(self) -> Path:
        return self.root / "dit"

    @property
    def vae(self) -> Path:
        return self.root / "vae"

    @property
    def text_encoder(self) -> Path:
        return self.root / "text_encoder"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def scheduler(self) -> Path:
        return self.root / "scheduler"

    def missing(self, subfolders: tuple[str, ...] = SUBFOLDERS) -> list[str]:
        """Subfolders that are absent or lack the file that marks them (e.g. `vae/config.json`)."""
        return [
            name
            for name in subfolders
            if not any((self.root / name / marker).is_file() for marker in _REQUIRED_FILES[name])
        ]

    def validate(self, subfolders: tuple[str, ...] = SUBFOLDERS) -> None:
        missing = self.missing(subfolders)
        if missing:
            detail = ", ".join(f"{name}/ (needs {' or '.join(_REQUIRED_FILES[name])})" for name in missing)
            raise CheckpointError(
                f"checkpoint {self.root} is missing {detail}. Fix: point the model path at a full "
                "download of LongCat-Video (it has dit/, vae/, text_encoder/, tokenizer/, scheduler/), "
                "or run `longcat demo` for a tiny random one."
            )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read {path}: {error}. Fix: restore this file from the release.") from error


def free_device_memory(device: str | torch.device | None = None) -> None:
    """Give the memory of models just dropped back: collect the Python cycles that hold them, then
    return the cached CUDA blocks (on `device`, or whenever CUDA is in use) or MPS blocks (on an
    `mps` device) for the next model."""
    gc.collect()
    if device is not None and torch.device(device).type == "mps":
        torch.mps.empty_cache()
    elif torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_dit_config(root: str | Path) -> dict[str, Any] | None:
    """`dit/config.json` of the checkpoint at `root` (None when there is none yet): the architecture
    the memory plan predicts for, read without loading a weight."""
    path = ModelLayout(root).dit / "config.json"
    return _read_json(path) if path.is_file() else None


def load_vae(
    root: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> AutoencoderKLWan:
    """The Wan 2.1 VAE from `vae/`, frozen and in eval mode."""
    layout = ModelLayout(root)
    layout.validate(("vae",))
    vae = AutoencoderKLWan.from_pretrained(layout.vae, torch_dtype=dtype, local_files_only=True, use_safetensors=True)
    return vae.to(device).eval().requires_grad_(False)


def load_text_encoder(
    root: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> UMT5EncoderModel:
    """The umT5 encoder from `text_encoder/`, frozen and in eval mode.

    The class is decided from `text_encoder/config.json`; anything but umT5 is refused, and the
    encoder's width is checked against the DiT's `caption_channels` when `dit/config.json` exists.
    """
    layout = ModelLayout(root)
    layout.validate(("text_encoder",))
    config_path = layout.text_encoder / "config.json"
    config = _read_json(config_path)
    if not is_umt5_config(config):
        raise CheckpointError(
            f"{config_path} describes model_type {config.get('model_type')!r} "
            f"(architectures {config.get('architectures')}), not umT5. LongCat-Video's DiT takes the "
            "4096-wide hidden states of umT5-XXL (transformers UMT5EncoderModel); guides that name "
            "Qwen2.5-VL are wrong for this checkpoint. Fix: use the release's own text_encoder/ folder."
        )
    dit_config_path = layout.dit / "config.json"
    if dit_config_path.is_file():
        caption_channels = _read_json(dit_config_path).get("caption_channels")
        if caption_channels is not None and caption_channels != config.get("d_model"):
            raise CheckpointError(
                f"{config_path} has d_model {config.get('d_model')} but {dit_config_path} expects "
                f"caption_channels {caption_channels}. Fix: use the text_encoder/ that ships with this dit/."
            )
    encoder = UMT5EncoderModel.from_pretrained(layout.text_encoder, dtype=dtype, local_files_only=True,
                                               use_safetensors=True)
    return encoder.to(device).eval().requires_grad_(False)


def load_tokenizer(root: str | Path) -> PreTrainedTokenizerBase:
    layout = ModelLayout(root)
    layout.validate(("tokenizer",))
    return AutoTokenizer.from_pretrained(layout.tokenizer, local_files_only=True)


def load_scheduler(root: str | Path) -> FlowMatchEulerDiscreteScheduler:
    """The flow-matching scheduler with the release's settings (shift 12.0) read from its config."""
    layout = ModelLayout(root)
    layout.validate(("scheduler",))
    return FlowMatchEulerDiscreteScheduler.from_pretrained(layout.scheduler, local_files_only=True)


def vae_latent_stats(vae: AutoencoderKLWan) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel `(latents_mean, latents_std)` from the VAE's config, float32, shape [16]."""
    stats = []
    for key in ("latents_mean", "latents_std"):
        values = getattr(vae.config, key, None)
        if values is None or len(values) != LATENT_CHANNELS:
            raise CheckpointError(
                f"vae config key {key!r} is {values!r}; expected {LATENT_CHANNELS} numbers. "
                "Fix: use the release's vae/config.json, which lists them."
            )
        stats.append(torch.tensor(values, dtype=torch.float32))
    if not (stats[1] > 0).all():
        raise CheckpointError(f"vae config key 'latents_std' has non-positive entries: {stats[1].tolist()}")
    return stats[0], stats[1]


def _channel_view(stat: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    # Latents are [..., C, T, H, W]: the channel axis is the fourth from the end.
    return stat.to(device=latents.device, dtype=torch.float32).view(-1, 1, 1, 1)


def normalize_latents(latents: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """`(z − mean) / std` per channel, what the DiT sees. Computed in float32, returned in z's dtype."""
    result = (latents.float() - _channel_view(mean, latents)) / _channel_view(std, latents)
    return result.to(latents.dtype)


def denormalize_latents(latents: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Inverse of `normalize_latents`, applied before decoding with the VAE."""
    result = latents.float() * _channel_view(std, latents) + _channel_view(mean, latents)
    return result.to(latents.dtype)
