"""The frozen DiT from the release's sharded `dit/` folder, streamed tensor by tensor.

Written here rather than through diffusers' `from_pretrained` because that loader materialises the
whole model on the host in the target dtype before anyone can move it (27 GiB of host RAM for the
bf16 13.6B DiT, then a second pass to copy it to the GPU). Here the model is built on the meta
device and each tensor is read from its memory-mapped shard, cast and put straight where it will
live, so host RAM holds one tensor (at most one block, for a per-block hook) at a time.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from .weight_keys import weight_shapes, verify_weight_keys
from .transformer import LongCatVideoTransformer3DModel

BLOCK_PREFIX = "blocks."


def _read_tensors(folder: Path, keys: list[str], files: dict[str, str], dtype: torch.dtype | None,
                  device: torch.device) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted({files[k] for k in keys}):
        with safe_open(folder / file, framework="pt") as f:
            for key in keys:
                if files[key] == file:
                    tensors[key] = f.get_tensor(key).to(device=device, dtype=dtype)
    return tensors


def load_dit(
    dit_folder: str | Path,
    dtype: torch.dtype | None,
    device: str | torch.device = "cpu",
    block_hook: Callable[[torch.nn.Module], None] | None = None,
    block_device: str | torch.device | None = None,
) -> LongCatVideoTransformer3DModel:
    """The transformer of `dit_folder` (config.json + safetensors shards with their index), frozen,
    weights in `dtype` (None: as stored) on `device`. The checkpoint's keys and shapes are checked
    against the model from the headers first, naming every mismatch before any weight is read.

    `block_hook(block)` runs on each block once it is filled, on `block_device` (default `device`),
    before the block moves to `device`: quantizing on the GPU that trains while the weights live on
    the host for block swapping, say."""
    folder = Path(dit_folder)
    config = json.loads((folder / "config.json").read_text())
    with torch.device("meta"):
        model = LongCatVideoTransformer3DModel.from_config(config)
    verify_weight_keys(folder, model.state_dict())
    files = {key: file for key, (_shape, file) in weight_shapes(folder).items()}
    device = torch.device(device)
    work_device = torch.device(block_device) if block_device is not None else device

    outside = [k for k in files if not k.startswith(BLOCK_PREFIX)]
    model.load_state_dict(_read_tensors(folder, outside, files, dtype, device), strict=False, assign=True)
    for index, block in enumerate(model.blocks):
        prefix = f"{BLOCK_PREFIX}{index}."
        tensors = _read_tensors(folder, [k for k in files if k.startswith(prefix)], files, dtype, work_device)
        block.load_state_dict({k.removeprefix(prefix): v for k, v in tensors.items()}, strict=True, assign=True)
        del tensors
        if block_hook is not None:
            block_hook(block)
        block.to(device)
    return model.eval().requires_grad_(False)
