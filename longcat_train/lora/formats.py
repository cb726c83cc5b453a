"""LoRA files in the formats users meet, through one in-memory form (`weights.LoraWeights`).
`LORA_FORMATS` is the table of formats: a new one is a writer and a reader here and its row there,
with its words (the config reads the row's name, `title` and `note` as text: `config/extension_tables.py`).

- `comfyui` (default): for ComfyUI-WanVideoWrapper, the route ComfyUI users have for LongCat-Video:
  `diffusion_model.<module in the wrapper's names>.lora_A.weight` / `.lora_B.weight` / `.alpha`
  (`wan_names`), fused q|k|v and k|v as one LoRA per projection (`split`). ComfyUI merges
  W += alpha/rank·B·A per module.
- `longcat-names`: the same keys with LongCat's own module names, for loaders that keep them
  (our checkpoints before the `comfyui` names).
- `official` (the LongCat release's own loader): `lora___lorahyphen___<module with . → ___lorahyphen___>`
  + `.lora_down.weight`, `.lora_up.weight` or, for the fused `attn.qkv` / `cross_attn.kv_linear`,
  split `.lora_up.blocks.{j}.weight` (block j applied to the j-th chunk of the down output), and a
  scalar `.alpha_scale`; applied as y = Wx + b + alpha_scale·up(down(x)). The loader builds every
  module at one rank, `lora_network_dim` (128 by default), and loads strictly, so every module is
  zero-padded to one rank: 128, or the largest projection rank when that is more
  (`official_network_dim`; the file's header names it).
- `diffusers`: `transformer.<module>.lora_A.weight` / `.lora_B.weight` with alpha/rank folded into
  lora_B (so alpha = rank: loaders that ignore the header, as diffusers does when given a file path,
  still render at the trained strength), and the PEFT `LoraConfig` in the `lora_adapter_metadata`
  header under `transformer.` keys, as diffusers' `load_lora_adapter` reads it.
Our own metadata (rank, alpha, targets, base model, steps, config hash) rides in every file's header.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..file_modes import write_aside
from .split import join_projections, projection_parts, split_count, trim_padding
from .wan_names import is_longcat_linear, longcat_name, wan_names
from .weights import LoraModule, LoraWeights

OFFICIAL_PREFIX = "lora___lorahyphen___"
OFFICIAL_HYPHEN = "___lorahyphen___"
OFFICIAL_RANK = 128  # the official loader's default lora_network_dim
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
DIFFUSERS_PREFIX = "transformer."
META_KEY = "longcat_train"
_PARTS = (".lora_A.weight", ".lora_B.weight", ".alpha")


@dataclass
class LoraFile:
    weights: LoraWeights
    format: str
    metadata: dict


def _with_prefix(modules: dict[str, LoraModule], prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in modules.items():
        out[f"{prefix}{name}.lora_A.weight"] = m.down
        out[f"{prefix}{name}.lora_B.weight"] = m.up
        out[f"{prefix}{name}.alpha"] = torch.tensor(float(m.alpha))
    return out


def _from_prefixed(state: dict[str, torch.Tensor], prefix: str, alpha_of: Callable[[str, int], float]) -> dict[str, LoraModule]:
    """`<prefix><module>.lora_A.weight` / `.lora_B.weight` (/ `.alpha`) as modules; any other key
    is refused by name rather than dropped. `alpha_of(module, rank)` where the file has no `.alpha`."""
    other = [k for k in state if not k.startswith(prefix) or not k.endswith(_PARTS)]
    if other:
        raise ValueError(f"keys that are not {prefix}<module>.lora_A.weight / .lora_B.weight / .alpha: {other[:5]}")
    modules = {}
    for key, down in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key.removeprefix(prefix).removesuffix(".lora_A.weight")
        up = state.get(f"{prefix}{name}.lora_B.weight")
        if up is None:
            raise ValueError(f"{key} has no {prefix}{name}.lora_B.weight")
        alpha = state.get(f"{prefix}{name}.alpha")
        modules[name] = LoraModule(down.float(), up.float(),
                                   float(alpha) if alpha is not None else alpha_of(name, down.shape[0]))
    return modules


def _rank_as_alpha(name: str, rank: int) -> float:
    return float(rank)  # no alpha: scale 1, as ComfyUI and PEFT take it


def _to_comfyui(w: LoraWeights) -> dict[str, torch.Tensor]:
    modules = {}
    for name, m in w.modules.items():
        names = wan_names(name)
        modules.update(zip(names, projection_parts(m, len(names))))
    return _with_prefix(modules, "diffusion_model.")


def _read_comfyui(state: dict[str, torch.Tensor], meta: dict, header: dict[str, str]) -> LoraWeights:
    grouped: dict[str, list[LoraModule | None]] = {}
    foreign = []
    for wan, part in _from_prefixed(state, "diffusion_model.", _rank_as_alpha).items():
        found = longcat_name(wan)
        if found is None:
            foreign.append(wan)
            continue
        name, j, n = found
        grouped.setdefault(name, [None] * n)[j] = part
    if foreign:
        raise ValueError(f"modules LongCat-Video does not have (in ComfyUI-WanVideoWrapper's names): "
                         f"{sorted(foreign)[:5]} (a Wan LoRA?)")
    return LoraWeights({name: parts[0] if len(parts) == 1 else join_projections(parts)
                        for name, parts in grouped.items()})


def _to_longcat_names(w: LoraWeights) -> dict[str, torch.Tensor]:
    return _with_prefix(w.modules, "diffusion_model.")


def _read_longcat_names(state: dict[str, torch.Tensor], meta: dict, header: dict[str, str]) -> LoraWeights:
    return LoraWeights(_from_prefixed(state, "diffusion_model.", _rank_as_alpha))


def _claims_wan_names(keys: list[str]) -> bool:
    """Some key names a module only the wrapper's naming has (the FFN's names are the same in both)."""
    names = {k.removeprefix("diffusion_model.").rsplit(".lora_", 1)[0].removesuffix(".alpha") for k in keys}
    return any(not is_longcat_linear(n) for n in names)


def _official_parts(w: LoraWeights) -> dict[str, list[LoraModule]]:
    return {name: projection_parts(m, split_count(name)) for name, m in w.modules.items()}


def official_network_dim(w: LoraWeights) -> int:
    """The `lora_network_dim` the official loader needs for our official file of `w`."""
    return max([OFFICIAL_RANK] + [p.rank for parts in _official_parts(w).values() for p in parts])


def _padded(t: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = size - shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def _to_official(w: LoraWeights) -> dict[str, torch.Tensor]:
    """Each projection's part (`split.projection_parts`) zero-padded to one rank D for the whole file:
    down = the parts' downs stacked, up block j = part j's up; block j computes B_j·A_j·x, exactly
    the j-th slice of the module's B·A·x."""
    dim = official_network_dim(w)
    out = {}
    for name, parts in _official_parts(w).items():
        key = OFFICIAL_PREFIX + name.replace(".", OFFICIAL_HYPHEN)
        out[f"{key}.lora_down.weight"] = torch.cat([_padded(p.down, dim, 0) for p in parts])
        if len(parts) == 1:
            out[f"{key}.lora_up.weight"] = _padded(parts[0].up, dim, 1)
        else:
            for j, p in enumerate(parts):
                out[f"{key}.lora_up.blocks.{j}.weight"] = _padded(p.up, dim, 1)
        out[f"{key}.alpha_scale"] = torch.tensor(parts[0].scale, dtype=torch.float32)
    return out


def _read_official(state: dict[str, torch.Tensor], meta: dict, header: dict[str, str]) -> LoraWeights:
    modules = {}
    for key in state:
        if not key.endswith(".lora_down.weight"):
            continue
        base = key.removesuffix(".lora_down.weight")
        name = base.removeprefix(OFFICIAL_PREFIX).replace(OFFICIAL_HYPHEN, ".")
        split_keys = sorted(
            (k for k in state if k.startswith(f"{base}.lora_up.blocks.")),
            key=lambda k: int(k.rsplit(".", 2)[-2]),
        )
        ups = [state[k].float() for k in split_keys] or [state[f"{base}.lora_up.weight"].float()]
        downs = state[key].float().chunk(len(ups), dim=0)
        scale = float(state[f"{base}.alpha_scale"])  # multiplies up·down; our alpha is scale·rank
        parts = [trim_padding(LoraModule(d, u, scale * d.shape[0])) for d, u in zip(downs, ups)]
        modules[name] = parts[0] if len(parts) == 1 else join_projections(parts)
    return LoraWeights(modules)


def _official_header(weights: LoraWeights, meta: dict) -> dict[str, str]:
    return {"lora_network_dim": str(official_network_dim(weights))}


def _to_diffusers(w: LoraWeights) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in w.modules.items():
        out[f"{DIFFUSERS_PREFIX}{name}.lora_A.weight"] = m.down
        out[f"{DIFFUSERS_PREFIX}{name}.lora_B.weight"] = m.up if m.scale == 1 else m.up * m.scale
    return out


def _diffusers_header(weights: LoraWeights, meta: dict) -> dict[str, str]:
    """The `LoraConfig` diffusers builds the adapter from (`load_lora_adapter` strips the
    `transformer.` prefix and passes the rest to `LoraConfig`): alpha = rank everywhere (folded)."""
    ranks = {name: m.rank for name, m in weights.modules.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    # full-match patterns: PEFT matches a pattern key as a suffix regex of the module name
    pattern = {f"^{re.escape(name)}": rank for name, rank in ranks.items() if rank != r}
    config = {"r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": pattern,
              "target_modules": sorted(ranks)}
    return {DIFFUSERS_METADATA_KEY: json.dumps({DIFFUSERS_PREFIX + k: v for k, v in config.items()}, sort_keys=True)}


def _diffusers_config(header: dict[str, str]) -> dict:
    """The LoraConfig entries of a diffusers header (prefixed, or without prefix as we wrote them
    before the `transformer.` keys)."""
    raw = json.loads(header.get(DIFFUSERS_METADATA_KEY, "{}"))
    if any(k.startswith(DIFFUSERS_PREFIX) for k in raw):
        return {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in raw.items() if k.startswith(DIFFUSERS_PREFIX)}
    return raw


def _read_diffusers(state: dict[str, torch.Tensor], meta: dict, header: dict[str, str]) -> LoraWeights:
    config = _diffusers_config(header)
    patterns = config.get("alpha_pattern") or {}

    def alpha_of(name: str, rank: int) -> float:
        for key, alpha in patterns.items():  # PEFT's rule: the key matches a suffix of the name
            if re.match(rf"(.*\.)?({key})$", name):
                return float(alpha)
        return float(config["lora_alpha"]) if config.get("lora_alpha") is not None else float(rank)

    return LoraWeights(_from_prefixed(state, DIFFUSERS_PREFIX, alpha_of))


def _no_header(weights: LoraWeights, meta: dict) -> dict[str, str]:
    return {}


def _any_keys(keys: list[str]) -> bool:
    return True


@dataclass(frozen=True)
class LoraFileFormat:
    """What one LoRA file format needs: the key prefix that tells its files apart, its writer and
    reader (both between `LoraWeights` and the file's tensors), and its words. The words are
    keywords with literal values: the config reads them from this file's text, without torch."""

    key_prefix: str  # every tensor key of the format starts with it; `detect_format` goes by it
    write: Callable[[LoraWeights], dict[str, torch.Tensor]]
    # (tensors, our metadata from the header, the whole header) -> weights
    read: Callable[[dict[str, torch.Tensor], dict, dict[str, str]], LoraWeights]
    # (weights, our metadata) -> header entries the format's own loaders read, besides ours
    header: Callable[[LoraWeights, dict], dict[str, str]] = _no_header
    # for formats sharing a prefix: whether a file's keys (all with the prefix) are this format's
    claims: Callable[[list[str]], bool] = _any_keys
    _: KW_ONLY
    title: str  # the name in a sentence: `export-lora --help`, error messages
    note: str = ""  # said after the name in `lora_export_formats`' description (config.md)


# The formats: the names `lora_export_formats` accepts and `export-lora --format` offers, in this
# order (the first is the default), through the config's `LORA_FORMAT_CHOICES`, read from here.
LORA_FORMATS: dict[str, LoraFileFormat] = {
    "comfyui": LoraFileFormat("diffusion_model.", _to_comfyui, _read_comfyui, claims=_claims_wan_names,
                              title="ComfyUI", note="ComfyUI-WanVideoWrapper's module names"),
    "longcat-names": LoraFileFormat("diffusion_model.", _to_longcat_names, _read_longcat_names,
                                    title="LongCat-named", note="LongCat's module names under `diffusion_model.`"),
    "official": LoraFileFormat(OFFICIAL_PREFIX, _to_official, _read_official, _official_header,
                               title="official LongCat", note="LongCat's own format"),
    "diffusers": LoraFileFormat(DIFFUSERS_PREFIX, _to_diffusers, _read_diffusers, _diffusers_header,
                                title="diffusers"),
}
FORMATS = tuple(LORA_FORMATS)


def detect_format(keys) -> str:
    keys = list(keys)
    # the longest (most specific) prefix first, so a file with keys of two formats reads as the
    # more specific one (official before ComfyUI before diffusers); formats sharing a prefix in
    # table order, each asked whether it claims the keys
    for name, fmt in sorted(LORA_FORMATS.items(), key=lambda item: -len(item[1].key_prefix)):
        prefixed = [k for k in keys if k.startswith(fmt.key_prefix)]
        if prefixed and fmt.claims(prefixed):
            return name
    expected = [f"'{fmt.key_prefix}' ({fmt.title})" for name, fmt in LORA_FORMATS.items()]
    raise ValueError("unrecognised LoRA file: expected keys starting with "
                     f"{', '.join(expected[:-1])} or {expected[-1]}")


def _check_module_names(weights: LoraWeights) -> None:
    foreign = [name for name in weights.modules if not is_longcat_linear(name)]
    if foreign:
        raise ValueError(f"modules that are not linears of LongCat-Video: {foreign[:5]}")


def write_lora(path: str | Path, weights: LoraWeights, fmt: str = "comfyui", metadata: dict | None = None) -> Path:
    if fmt not in FORMATS:
        raise ValueError(f"LoRA format {fmt!r}: choose one of {FORMATS}")
    _check_module_names(weights)
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
    # (a clone each: the projections of a fused layer share one down tensor, which safetensors refuses)
    plain = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
    return write_aside(path, lambda temporary: save_file(plain, str(temporary), metadata=header))


def read_lora(path: str | Path) -> LoraFile:
    """Read any format of `LORA_FORMATS` (and the official `cfg_step_lora` / `refinement_lora` files)."""
    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(header.get(META_KEY, "{}"))
    fmt = detect_format(state)
    try:
        weights = LORA_FORMATS[fmt].read(state, meta, header)
        _check_module_names(weights)
    except ValueError as error:
        raise ValueError(f"{path} ({LORA_FORMATS[fmt].title} format): {error}") from None
    if not weights.modules:
        raise ValueError(f"{path}: no LoRA modules found")
    return LoraFile(weights=weights, format=fmt, metadata=meta)


def unknown_module_names(weights: LoraWeights, model: torch.nn.Module) -> list[str]:
    """Names in the LoRA that are not linears of the model (for a clear error before a render)."""
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return [n for n in weights.modules if re.sub(r"\.base_layer$", "", n) not in linears]
