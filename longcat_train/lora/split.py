"""A fused layer's LoRA as one LoRA per projection, and back, exactly.

`attn.qkv` computes q|k|v and `cross_attn.kv_linear` k|v as row blocks of one linear. A LoRA on it
(up B [out, r], down A [r, in]) changes projection j by B_j·A, B_j the j-th row block of B: that
is a LoRA of its own with the shared A. The official format and ComfyUI-WanVideoWrapper's names
keep the projections apart; our adapters and the diffusers format keep the fused layer.
"""

from __future__ import annotations

import torch

from .weights import LoraModule

FUSED_SPLITS = {"attn.qkv": 3, "cross_attn.kv_linear": 2}


def split_count(module: str) -> int:
    for suffix, n in FUSED_SPLITS.items():
        if module.endswith(suffix):
            return n
    return 1


def projection_parts(m: LoraModule, n: int) -> list[LoraModule]:
    """Projection j's LoRA at the module's scale: B_j with the shared A, or, when the projections
    use disjoint columns of B (the block-diagonal official LoRAs), B_j's columns with A's matching
    rows only. A plain LoRA keeps its rank in every part, so `join_projections` rebuilds it."""
    if n == 1:
        return [m]
    ups = m.up.chunk(n, dim=0)
    used = [up.abs().sum(dim=0) != 0 for up in ups]
    counts = torch.stack(used).sum(dim=0)
    if int(counts.max()) != 1 or all(u.all() for u in used):  # shared columns, or B all zero
        return [LoraModule(m.down, up, m.alpha) for up in ups]
    parts = []
    for up, cols in zip(ups, used):
        if not cols.any():
            cols = torch.arange(m.rank) == 0  # nothing to add: one zero component keeps it a LoRA
        parts.append(LoraModule(m.down[cols], up[:, cols], m.alpha * int(cols.sum()) / m.rank))
    return parts


def join_projections(parts: list[LoraModule | None]) -> LoraModule:
    """One LoRA on the fused layer from its projections' (None: that projection has none). Shared
    down and scale (what `projection_parts` makes of ours) give back the plain B·A; otherwise the
    downs are stacked and B is block-diagonal (rank = the sum), with each scale folded into its
    block when they differ."""
    present = [p for p in parts if p is not None]
    out = present[0].up.shape[0]  # the projections of a fused layer are equally wide
    if len(present) == len(parts) and all(
        torch.equal(p.down, present[0].down) and p.scale == present[0].scale for p in present[1:]
    ):
        return LoraModule(present[0].down, torch.cat([p.up for p in present]), present[0].alpha)
    same_scale = all(p.scale == present[0].scale for p in present)
    down = torch.cat([p.down for p in present])
    up = torch.zeros(out * len(parts), down.shape[0], dtype=present[0].up.dtype)
    column = 0
    for j, p in enumerate(parts):
        if p is None:
            continue
        up[j * out : (j + 1) * out, column : column + p.rank] = p.up if same_scale else p.up * p.scale
        column += p.rank
    return LoraModule(down, up, present[0].scale * down.shape[0] if same_scale else float(down.shape[0]))


def trim_padding(m: LoraModule) -> LoraModule:
    """Drop rank components whose down row and up column are both zero (zero padding: the
    official loader wants rank `lora_network_dim`); each contributes nothing."""
    used = (m.down.abs().sum(dim=1) != 0) | (m.up.abs().sum(dim=0) != 0)
    if used.all() or not used.any():
        return m
    count = int(used.sum())
    return LoraModule(m.down[used], m.up[:, used], m.scale * count)
