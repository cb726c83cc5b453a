"""Atomic safetensors writes, corruption detection and identities used by both caches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from longcat_train.cache import keys
from longcat_train.cache.keys import (
    CacheEntryCorrupt,
    module_identity,
    probe_safetensors,
    read_safetensors_verified,
    stable_hash,
    write_safetensors_atomic,
)

META = {"format": "1", "key": "abc"}


def test_stable_hash_ignores_key_order_but_not_values() -> None:
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})


def test_atomic_write_round_trips_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "entry.safetensors"
    tensors = {"x": torch.arange(6, dtype=torch.float32).view(2, 3), "y": torch.ones(2, dtype=torch.bfloat16)}
    write_safetensors_atomic(path, tensors, META)
    read, metadata = read_safetensors_verified(path, META, ("x", "y"))
    torch.testing.assert_close(read["x"], tensors["x"])
    assert read["y"].dtype == torch.bfloat16 and metadata["key"] == "abc"
    assert [p.name for p in path.parent.iterdir()] == ["entry.safetensors"]


def test_a_failed_write_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "entry.safetensors"
    write_safetensors_atomic(path, {"x": torch.zeros(3)}, META)
    before = path.read_bytes()

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(keys, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_safetensors_atomic(path, {"x": torch.ones(3)}, META)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["entry.safetensors"]


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("truncate", "unreadable safetensors"),
        ("zero_bytes", "unreadable safetensors"),
        ("other_key", "metadata 'key'"),
        ("no_metadata", "no metadata"),
        ("nan", "NaN"),
        ("missing_tensor", "missing tensors"),
    ],
)
def test_damaged_entries_are_detected(tmp_path: Path, damage: str, reason: str) -> None:
    path = tmp_path / "entry.safetensors"
    write_safetensors_atomic(path, {"x": torch.randn(64)}, META)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-10])
    elif damage == "zero_bytes":
        path.write_bytes(b"")
    elif damage == "other_key":
        write_safetensors_atomic(path, {"x": torch.randn(64)}, {**META, "key": "xyz"})
    elif damage == "no_metadata":
        save_file({"x": torch.randn(64)}, str(path))
    elif damage == "nan":
        write_safetensors_atomic(path, {"x": torch.full((64,), float("nan"))}, META)
    elif damage == "missing_tensor":
        write_safetensors_atomic(path, {"z": torch.randn(64)}, META)
    with pytest.raises(CacheEntryCorrupt) as raised:
        read_safetensors_verified(path, META, ("x",))
    assert reason in raised.value.reason and raised.value.path == path


def test_probe_catches_truncation_without_reading_tensors(tmp_path: Path) -> None:
    path = tmp_path / "entry.safetensors"
    write_safetensors_atomic(path, {"x": torch.randn(1000)}, META)
    assert probe_safetensors(path, META)["key"] == "abc"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(CacheEntryCorrupt, match="unreadable"):
        probe_safetensors(path, META)


def test_module_identity_tracks_weights_and_dtype() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 8)
    same = torch.nn.Linear(8, 8)
    same.load_state_dict(layer.state_dict())
    assert module_identity(layer) == module_identity(same)
    with torch.no_grad():
        same.weight.add_(1e-3)
    assert module_identity(layer) != module_identity(same)
    # Equal values (zeros are exact in both), other dtype: the encoder computes differently.
    zeros = torch.nn.Linear(8, 8)
    torch.nn.init.zeros_(zeros.weight)
    torch.nn.init.zeros_(zeros.bias)
    zeros_bf16 = torch.nn.Linear(8, 8)
    zeros_bf16.load_state_dict(zeros.state_dict())
    assert module_identity(zeros) != module_identity(zeros_bf16.to(torch.bfloat16))
