"""Content keys, encoder identities and safe safetensors files for the caches.

A cache entry's key is a hash of everything its content depends on, so a stale entry is never
found: it simply has another name. Files are written atomically and verified on read, so a
killed run or a damaged disk shows up as "rebuild this entry", never as wrong training data.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, save_file

from longcat_train.file_modes import write_aside

# Elements read from each weight tensor for a module's identity: enough that any real change of
# the weights (fine-tuning, another release, another dtype) changes the hash, while hashing a
# 13B-parameter encoder stays instant.
_SAMPLES_PER_TENSOR = 256
_CHECKSUM_KEY = "payload_sha256"


class CacheEntryCorrupt(Exception):
    """A cache file exists but cannot be trusted; `reason` says why."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace, so equal values always give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def stable_hash(value: Any) -> str:
    """Hex sha256 of `value`'s canonical JSON."""
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()


def _portable_config(config: Mapping[str, Any]) -> dict[str, Any]:
    # Keys starting with "_" (name_or_path, library versions, defaults bookkeeping) and the
    # transformers version change when a checkpoint is moved or a library upgraded, not the maths.
    return {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}


def _config_dict(module: torch.nn.Module) -> dict[str, Any]:
    config = getattr(module, "config", None)
    if config is None:
        return {}
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return _portable_config(as_dict)


def sample_indices(count: int, samples: int = _SAMPLES_PER_TENSOR) -> torch.Tensor:
    """`min(count, samples)` evenly spread element indices from 0 to count − 1, in exact integer
    arithmetic: a float32 `linspace` rounds past the last element above 2^24 elements (umT5-XXL's
    embedding has 1.05e9) and differs between CPU and CUDA, which would change the identity."""
    taken = min(count, samples)
    if taken <= 1:
        return torch.zeros(taken, dtype=torch.int64)
    return torch.arange(taken, dtype=torch.int64) * (count - 1) // (taken - 1)


def _tensor_digest(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().reshape(-1)
    if flat.numel() == 0:
        return b""
    return flat[sample_indices(flat.numel()).to(flat.device)].float().cpu().numpy().tobytes()


def module_identity(module: torch.nn.Module) -> str:
    """Identity of an encoder: class, portable config, and per tensor name, shape, dtype and a
    sample of its values (what the encoder computes; not where it was loaded from)."""
    digest = hashlib.sha256()
    digest.update(type(module).__name__.encode())
    digest.update(canonical_json(_config_dict(module)).encode())
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        if type(tensor) is torch.Tensor:
            digest.update(_tensor_digest(tensor))
        else:
            # Quantized tensor subclasses have no plain element view; their type stands in.
            digest.update(type(tensor).__name__.encode())
    return digest.hexdigest()


def tokenizer_identity(tokenizer: Any) -> str:
    """Identity of a tokenizer: its full backend definition (vocab, normalizer, pre-tokenizer,
    post-processor) without the padding/truncation state that each call changes."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        definition.pop("padding", None)
        definition.pop("truncation", None)
    else:
        definition = {"vocab": sorted(tokenizer.get_vocab().items())}
    definition["class"] = type(tokenizer).__name__
    definition["special_tokens"] = {
        "pad": tokenizer.pad_token,
        "eos": tokenizer.eos_token,
        "unk": tokenizer.unk_token,
    }
    return stable_hash(definition)


def payload_checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_safetensors_atomic(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write `tensors` to `path` so that readers see the old file or the whole new one, never a
    part: a temporary file in the same directory, flushed to disk, then renamed over `path`."""
    contiguous = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    full_metadata = {**metadata, _CHECKSUM_KEY: payload_checksum(contiguous)}
    write_aside(path, lambda temporary: save_file(contiguous, str(temporary), metadata=full_metadata), durable=True)


def _check_metadata(path: Path, found: Mapping[str, str] | None, expected: Mapping[str, str]) -> dict[str, str]:
    if found is None:
        raise CacheEntryCorrupt(path, "no metadata in the safetensors header")
    for key, value in expected.items():
        if found.get(key) != value:
            raise CacheEntryCorrupt(path, f"metadata {key!r} is {found.get(key)!r}, expected {value!r}")
    return dict(found)


def probe_safetensors(path: Path, expected_metadata: Mapping[str, str]) -> dict[str, str]:
    """Cheap check without reading the tensors: the header parses, covers the whole file (so a
    truncated file fails) and its metadata matches. Returns the metadata."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            found = handle.metadata()
    except (SafetensorError, OSError) as error:
        raise CacheEntryCorrupt(path, f"unreadable safetensors file ({error})") from error
    return _check_metadata(path, found, expected_metadata)


def read_safetensors_verified(
    path: Path, expected_metadata: Mapping[str, str], expected_tensors: tuple[str, ...]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Full check: header and metadata as in `probe_safetensors`, the expected tensors present,
    their bytes matching the checksum written with them, and every value finite."""
    metadata = probe_safetensors(path, expected_metadata)
    try:
        # Read into memory rather than memory-map: a mapped tensor would change under the
        # caller if the file were later overwritten in place.
        tensors = load(path.read_bytes())
    except (SafetensorError, OSError) as error:
        raise CacheEntryCorrupt(path, f"unreadable safetensors file ({error})") from error
    missing = [name for name in expected_tensors if name not in tensors]
    if missing:
        raise CacheEntryCorrupt(path, f"missing tensors {missing}")
    if payload_checksum(tensors) != metadata.get(_CHECKSUM_KEY):
        raise CacheEntryCorrupt(path, "tensor bytes do not match the stored checksum")
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise CacheEntryCorrupt(path, f"tensor {name!r} holds NaN or inf")
    return tensors, metadata
