"""Header-only check of a `dit/` checkpoint against the model's state_dict, before any weight is read.

diffusers' own loader reports problems late and tersely; a user with a 54 GB download deserves the
list of missing, unexpected and mis-shaped keys at once, naming the files.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open


class WeightKeyError(ValueError):
    pass


def weight_shapes(folder: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """key → (shape, file name) for every tensor in the folder's safetensors files (index-aware)."""
    folder = Path(folder)
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        files = sorted(set(json.loads(indexes[0].read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise WeightKeyError(f"{folder}: no *.safetensors weights found (expected the release's dit/ folder)")
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise WeightKeyError(f"{path}: listed in the index but missing; re-download this shard")
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                shapes[key] = (tuple(f.get_slice(key).get_shape()), name)
    return shapes


def verify_weight_keys(folder: Path, expected_state_dict) -> None:
    found = weight_shapes(folder)
    expected = {k: tuple(v.shape) for k, v in expected_state_dict.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = [
        f"{k}: checkpoint {found[k][0]} in {found[k][1]}, model {expected[k]}"
        for k in sorted(set(expected) & set(found))
        if found[k][0] != expected[k]
    ]
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{folder}: the checkpoint does not match config.json's model."]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if items:
            shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
            lines.append(f"{title} ({len(items)}):\n  " + "\n  ".join(shown))
    lines.append("Fix: point pretrained_model_name_or_path at an unmodified LongCat-Video release (its dit/ folder "
                 "and its config.json belong together).")
    raise WeightKeyError("\n".join(lines))
