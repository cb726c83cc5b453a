"""A random-weight LongCat-Video with the release's layout and shapes, built on a GPU in minutes:
the 13.6B DiT in float32 shards with their index (bfloat16 where the disk is too small), umT5-XXL
with its 256,384-token vocabulary (tokenizer and encoder), the Wan 2.1 VAE and the shift-12 scheduler. `longcat bench --mode e2e`
trains on it the way users train on the release, whose weights cannot be downloaded here. Smaller
configs give the same layout at a size a CPU test can run.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import UMT5Config, UMT5EncoderModel

from ..model.release import random_transformer
from ..release_facts import RELEASE_DIT_CONFIG, RELEASE_UMT5_CONFIG
from .tiny_model import write_scheduler, write_umt5_tokenizer, write_vae

COMPLETE_MARKER = ".complete"
DIT_SHARD_SIZE = "10GB"  # six shards at the release's size, as released
SPARE_BYTES = 12e9  # caches, three training checkpoints (LoRA r32 + AdamW ~2 GB each), renders


def _meta_umt5(config: Mapping[str, Any]) -> UMT5EncoderModel:
    umt5_config = UMT5Config(**config)
    umt5_config.architectures = ["UMT5EncoderModel"]
    with torch.device("meta"):
        return UMT5EncoderModel(umt5_config)


def _random_umt5(config: Mapping[str, Any], device: str, dtype: torch.dtype, seed: int) -> UMT5EncoderModel:
    """umT5's encoder with N(0, 0.02) weights and unit norms, allocated on `device` directly."""
    model = _meta_umt5(config).to_empty(device=device)
    model.tie_weights()  # `to_empty` gave the shared embedding and the encoder's view of it separate storage
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "layer_norm" in name:
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.02, generator=generator)
    return model.to(dtype)


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def storage_dtypes(root: Path, dit_config: Mapping[str, Any],
                   umt5_config: Mapping[str, Any]) -> tuple[torch.dtype, torch.dtype]:
    """(DiT, text encoder) storage dtypes: float32 as released where the disk holds it beside the
    run's files, the DiT first; bfloat16 otherwise. A GPU machine's 64 GiB disk does not hold the
    release's 77 GB of float32 weights and a run (seen: checkpoints failed with ENOSPC)."""
    from ..model import LongCatVideoTransformer3DModel

    with torch.device("meta"):
        dit = _parameters(LongCatVideoTransformer3DModel(**dit_config))
    encoder = _parameters(_meta_umt5(umt5_config))
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free - SPARE_BYTES
    for dit_dtype, encoder_dtype in ((torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                     (torch.bfloat16, torch.float32)):
        if dit * dit_dtype.itemsize + encoder * encoder_dtype.itemsize <= free:
            return dit_dtype, encoder_dtype
    return torch.bfloat16, torch.bfloat16


def write_release_model(
    root: str | Path,
    device: str = "cuda",
    seed: int = 0,
    dit_config: Mapping[str, Any] = RELEASE_DIT_CONFIG,
    umt5_config: Mapping[str, Any] = RELEASE_UMT5_CONFIG,
    vae_config: Mapping[str, Any] | None = None,
) -> dict:
    """Write the checkpoint under `root` (reused when a complete one is there) with random weights
    made on `device`; `vae_config` None is diffusers' default, the Wan 2.1 VAE and its latent
    statistics. Returns what was written: {"dit_dtype", "text_encoder_dtype", "dit_shards"}."""
    root = Path(root)
    marker = root / COMPLETE_MARKER
    if marker.is_file():
        return json.loads(marker.read_text())
    dit_dtype, encoder_dtype = storage_dtypes(root, dit_config, umt5_config)
    write_umt5_tokenizer(root / "tokenizer", umt5_config["vocab_size"])
    write_scheduler(root / "scheduler")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        write_vae(root / "vae", vae_config or {})
    encoder = _random_umt5(umt5_config, device, encoder_dtype, seed + 1)
    encoder.save_pretrained(root / "text_encoder", max_shard_size="5GB")
    del encoder
    dit = random_transformer(device, dit_dtype, seed=seed + 2, **dit_config)
    dit.save_pretrained(root / "dit", max_shard_size=DIT_SHARD_SIZE, safe_serialization=True)
    del dit
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    facts = {"dit_dtype": str(dit_dtype).removeprefix("torch."),
             "text_encoder_dtype": str(encoder_dtype).removeprefix("torch."),
             "dit_shards": len(list((root / "dit").glob("*.safetensors")))}
    marker.write_text(json.dumps(facts))
    return facts
