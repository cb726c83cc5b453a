"""The official implementation's reference outputs (tests/fixtures, copied from the shared fixtures)."""

import functools
import json
from pathlib import Path

import torch
from safetensors import safe_open

from longcat_train.model import LongCatVideoTransformer3DModel

REFERENCE_PATH = Path(__file__).parent / "fixtures" / "longcat_dit_reference.safetensors"
# the official pipeline's distilled and continuation loops (tests/fixtures/make_official_reference.py)
OFFICIAL_MODES_PATH = Path(__file__).parent / "fixtures" / "longcat_official_modes.safetensors"


@functools.lru_cache(maxsize=1)
def _read():
    with safe_open(REFERENCE_PATH, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["config"])


def load_reference():
    tensors, config = _read()
    return {k: v.clone() for k, v in tensors.items()}, dict(config)


def load_official_modes(group: str) -> tuple[dict[str, torch.Tensor], dict]:
    """One group of the official modes fixture (`distill_i2v`, `continuation`): its tensors by
    short name, and its settings."""
    with safe_open(OFFICIAL_MODES_PATH, framework="pt") as f:
        tensors = {k.removeprefix(f"{group}."): f.get_tensor(k) for k in f.keys() if k.startswith(f"{group}.")}
        return tensors, json.loads(f.metadata()[group])


def reference_model() -> LongCatVideoTransformer3DModel:
    tensors, config = load_reference()
    model = LongCatVideoTransformer3DModel(**config).eval()
    model.load_state_dict({k.removeprefix("dit."): v for k, v in tensors.items() if k.startswith("dit.")}, strict=True)
    return model


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()
