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


# The official LoRA format's fused layers: one down of n·rank rows, n up blocks (q|k|v, k|v).
OFFICIAL_FUSED = {"attn.qkv": 3, "cross_attn.kv_linear": 2}


def official_lora_state(linears: dict[str, torch.nn.Linear], rank: int, alpha_scale: float,
                        generator: torch.Generator, scale: float) -> dict[str, torch.Tensor]:
    """What the official `LoRANetwork` saves for these linears (random weights of `scale`): per
    module a down of n·rank rows and n up blocks for the fused layers (`OFFICIAL_FUSED`), so the
    ranks read back as qkv 3r, kv 2r, rest r, and a scalar `alpha_scale`."""
    state = {}
    for name, linear in linears.items():
        n = next((k for suffix, k in OFFICIAL_FUSED.items() if name.endswith(suffix)), 1)
        key = "lora___lorahyphen___" + name.replace(".", "___lorahyphen___")
        state[f"{key}.lora_down.weight"] = torch.randn(n * rank, linear.in_features, generator=generator) * scale
        ups = [torch.randn(linear.out_features // n, rank, generator=generator) * scale for _ in range(n)]
        if n == 1:
            state[f"{key}.lora_up.weight"] = ups[0]
        else:
            state.update({f"{key}.lora_up.blocks.{j}.weight": up for j, up in enumerate(ups)})
        state[f"{key}.alpha_scale"] = torch.tensor(alpha_scale)
    return state
