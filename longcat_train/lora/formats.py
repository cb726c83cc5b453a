"""LoRA files in the formats users meet, through one in-memory form. `LORA_FORMATS` is the table of
formats: a new one is a writer and a reader here, its row there and its name in the config's
`LORA_FORMAT_CHOICES`.

- `comfyui` (default): `diffusion_model.<module>.lora_A.weight` / `.lora_B.weight` / `.alpha`.
- `official` (the LongCat release's own loader): `lora___lorahyphen___<module with . → ___lorahyphen___>`
  + `.lora_down.weight`, `.lora_up.weight` or, for the fused `attn.qkv` / `cross_attn.kv_linear`,
  split `.lora_up.blocks.{j}.weight`, and a scalar `.alpha_scale`; applied as
  y = Wx + b + alpha_scale·up(down(x)). The official loader builds rank `lora_network_dim` (128 by
  default) modules and loads strictly, so we zero-pad the rank to 128: the output is unchanged and
  the file loads with the official defaults.
- `diffusers`: `transformer.<module>.lora_A.weight` / `.lora_B.weight`, rank and alpha in the
  `lora_adapter_metadata` header entry.
Our own metadata (rank, alpha, targets, base model, steps, config hash) rides in every file's header.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..file_modes import give_umask_mode
from ..config.training import LORA_FORMAT_CHOICES

FUSED_SPLITS = {"attn.qkv": 3, "cross_attn.kv_linear": 2}
OFFICIAL_PREFIX = "lora___lorahyphen___"
OFFICIAL_HYPHEN = "___lorahyphen___"
OFFICIAL_RANK = 128
META_KEY = "longcat_train"


@dataclass
class LoraModule:
    down: torch.Tensor  # [r, in]
    up: torch.Tensor  # [out, r]
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass
class LoraWeights:
    modules: dict[str, LoraModule] = field(default_factory=dict)

    @classmethod
    def from_peft_state(cls, state: dict[str, torch.Tensor], alpha: float) -> "LoraWeights":
        modules = {}
        for key, down in state.items():
            if key.endswith(".lora_A.weight"):
                name = key.removesuffix(".lora_A.weight")
                up = state[f"{name}.lora_B.weight"]
                modules[name] = LoraModule(down.detach().cpu().clone(), up.detach().cpu().clone(), float(alpha))
        return cls(modules)

    def to_peft_state(self) -> dict[str, torch.Tensor]:
        state = {}
        for name, m in self.modules.items():
            state[f"{name}.lora_A.weight"] = m.down
            state[f"{name}.lora_B.weight"] = m.up
        return state


@dataclass
class LoraFile:
    weights: LoraWeights
    format: str
    metadata: dict


def _split_count(module: str) -> int:
    for suffix, n in FUSED_SPLITS.items():
        if module.endswith(suffix):
            return n
    return 1


def _to_comfyui(w: LoraWeights) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in w.modules.items():
        out[f"diffusion_model.{name}.lora_A.weight"] = m.down
        out[f"diffusion_model.{name}.lora_B.weight"] = m.up
        out[f"diffusion_model.{name}.alpha"] = torch.tensor(m.alpha)
    return out


def _to_diffusers(w: LoraWeights) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in w.modules.items():
        out[f"transformer.{name}.lora_A.weight"] = m.down
        out[f"transformer.{name}.lora_B.weight"] = m.up
    return out


def _to_official(w: LoraWeights) -> dict[str, torch.Tensor]:
    """A fused layer's LoRA B·A becomes n copies of A stacked (down) and B's row blocks (ups): block j
    computes B_j·A·x, exactly the j-th slice of B·A·x."""
    out = {}
    for name, m in w.modules.items():
        key = OFFICIAL_PREFIX + name.replace(".", OFFICIAL_HYPHEN)
        n = _split_count(name)
        rank = max(m.rank, OFFICIAL_RANK)
        down = torch.zeros(n * rank, m.down.shape[1], dtype=m.down.dtype)
        for j in range(n):
            down[j * rank : j * rank + m.rank] = m.down
        ups = m.up.chunk(n, dim=0)
        if n == 1:
            up = torch.zeros(m.up.shape[0], rank, dtype=m.up.dtype)
            up[:, : m.rank] = m.up
            out[f"{key}.lora_up.weight"] = up
        else:
            for j, up_j in enumerate(ups):
                padded = torch.zeros(up_j.shape[0], rank, dtype=m.up.dtype)
                padded[:, : m.rank] = up_j
                out[f"{key}.lora_up.blocks.{j}.weight"] = padded
        out[f"{key}.lora_down.weight"] = down
        out[f"{key}.alpha_scale"] = torch.tensor(m.scale, dtype=torch.float32)
    return out


def _from_official(state: dict[str, torch.Tensor], true_rank: int | None) -> LoraWeights:
    modules = {}
    for key in state:
        if not key.endswith(".lora_down.weight"):
            continue
        base = key.removesuffix(".lora_down.weight")
        name = base.removeprefix(OFFICIAL_PREFIX).replace(OFFICIAL_HYPHEN, ".")
        down = state[key].float()
        scale = float(state[f"{base}.alpha_scale"])
        split_keys = sorted(
            (k for k in state if k.startswith(f"{base}.lora_up.blocks.")),
            key=lambda k: int(k.rsplit(".", 2)[-2]),
        )
        ups = [state[k].float() for k in split_keys] or [state[f"{base}.lora_up.weight"].float()]
        n = len(ups)
        r = down.shape[0] // n
        downs = down.chunk(n, dim=0)
        keep = true_rank if true_rank is not None else r
        if all(torch.equal(downs[0], d) for d in downs[1:]):
            # written by us (or any LoRA of the plain B·A form): one shared down projection
            a = downs[0][:keep]
            b = torch.cat([u[:, :keep] for u in ups], dim=0)
        else:
            # genuinely split (the official LoRAs): rank n·r with a block-diagonal up projection
            a = down
            b = torch.block_diag(*ups)
        # alpha_scale multiplies up·down; we store alpha with scale = alpha / rank
        modules[name] = LoraModule(a.contiguous(), b.contiguous(), scale * a.shape[0])
    return LoraWeights(modules)


def _from_prefixed(state: dict[str, torch.Tensor], prefix: str, alpha_default: float | None) -> LoraWeights:
    modules = {}
    for key, down in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key.removesuffix(".lora_A.weight").removeprefix(prefix)
        up = state[key.replace(".lora_A.weight", ".lora_B.weight")]
        alpha_key = key.replace(".lora_A.weight", ".alpha")
        alpha = float(state[alpha_key]) if alpha_key in state else (alpha_default or down.shape[0])
        modules[name] = LoraModule(down.float(), up.float(), alpha)
    return LoraWeights(modules)


def _read_comfyui(state: dict[str, torch.Tensor], meta: dict, header: dict[str, str]) -> LoraWeights:
    return _from_prefixed(state, "diffusion_model.", None)


def _read_official(state: dict[str, torch.Tensor], meta: dict, header: dict[str, str]) -> LoraWeights:
    return _from_official(state, meta.get("rank"))


def _read_diffusers(state: dict[str, torch.Tensor], meta: dict, header: dict[str, str]) -> LoraWeights:
    adapter = json.loads(header.get("lora_adapter_metadata", "{}"))
    return _from_prefixed(state, "transformer.", adapter.get("lora_alpha"))


def _diffusers_header(weights: LoraWeights, meta: dict) -> dict[str, str]:
    return {"lora_adapter_metadata": json.dumps(
        {"r": meta.get("rank"), "lora_alpha": meta.get("alpha"),
         "target_modules": sorted({n.split(".", 2)[-1] for n in weights.modules})}
    )}


def _no_header(weights: LoraWeights, meta: dict) -> dict[str, str]:
    return {}


@dataclass(frozen=True)
class LoraFileFormat:
    """What one LoRA file format needs: the key prefix that tells its files apart, and its writer
    and reader (both between `LoraWeights` and the file's tensors)."""

    key_prefix: str  # every tensor key of the format starts with it; `detect_format` goes by it
    write: Callable[[LoraWeights], dict[str, torch.Tensor]]
    # (tensors, our metadata from the header, the whole header) -> weights
    read: Callable[[dict[str, torch.Tensor], dict, dict[str, str]], LoraWeights]
    # (weights, our metadata) -> header entries the format's own loaders read, besides ours
    header: Callable[[LoraWeights, dict], dict[str, str]] = _no_header


# The formats, in the order of the config's `LORA_FORMAT_CHOICES` (the names `lora_export_formats`
# accepts and `export-lora --format` offers, with their descriptions).
LORA_FORMATS: dict[str, LoraFileFormat] = {
    "comfyui": LoraFileFormat("diffusion_model.", _to_comfyui, _read_comfyui),
    "official": LoraFileFormat(OFFICIAL_PREFIX, _to_official, _read_official),
    "diffusers": LoraFileFormat("transformer.", _to_diffusers, _read_diffusers, _diffusers_header),
}
if list(LORA_FORMATS) != list(LORA_FORMAT_CHOICES):  # a name the config accepts needs code, and back
    raise RuntimeError(f"LORA_FORMATS {list(LORA_FORMATS)} and the config's LORA_FORMAT_CHOICES "
                       f"{list(LORA_FORMAT_CHOICES)} must name the same formats in the same order")
FORMATS = tuple(LORA_FORMATS)


def detect_format(keys) -> str:
    keys = list(keys)
    # the longest (most specific) prefix first, so a file with keys of two formats reads as the
    # more specific one (official before ComfyUI before diffusers)
    for name, fmt in sorted(LORA_FORMATS.items(), key=lambda item: -len(item[1].key_prefix)):
        if any(k.startswith(fmt.key_prefix) for k in keys):
            return name
    expected = [f"'{fmt.key_prefix}' ({LORA_FORMAT_CHOICES[name].title})" for name, fmt in LORA_FORMATS.items()]
    raise ValueError("unrecognised LoRA file: expected keys starting with "
                     f"{', '.join(expected[:-1])} or {expected[-1]}")


def write_lora(path: str | Path, weights: LoraWeights, fmt: str = "comfyui", metadata: dict | None = None) -> Path:
    if fmt not in FORMATS:
        raise ValueError(f"LoRA format {fmt!r}: choose one of {FORMATS}")
    path = Path(path)
    meta = dict(metadata or {})
    ranks = {m.rank for m in weights.modules.values()}
    alphas = {m.alpha for m in weights.modules.values()}
    if len(ranks) == 1:
        meta.setdefault("rank", ranks.pop())
    if len(alphas) == 1:
        meta.setdefault("alpha", alphas.pop())
    tensors = LORA_FORMATS[fmt].write(weights)
    header = {META_KEY: json.dumps(meta, sort_keys=True), "format": fmt, **LORA_FORMATS[fmt].header(weights, meta)}
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=header)
    give_umask_mode(tmp)
    tmp.replace(path)
    return path


def read_lora(path: str | Path) -> LoraFile:
    """Read any format of `LORA_FORMATS` (and the official `cfg_step_lora` / `refinement_lora` files)."""
    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(header.get(META_KEY, "{}"))
    fmt = detect_format(state)
    weights = LORA_FORMATS[fmt].read(state, meta, header)
    if not weights.modules:
        raise ValueError(f"{path}: no LoRA modules found")
    return LoraFile(weights=weights, format=fmt, metadata=meta)


def unknown_module_names(weights: LoraWeights, model: torch.nn.Module) -> list[str]:
    """Names in the LoRA that are not linears of the model (for a clear error before a render)."""
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return [n for n in weights.modules if re.sub(r"\.base_layer$", "", n) not in linears]
