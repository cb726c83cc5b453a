"""LongCat-Video's linears under the names ComfyUI-WanVideoWrapper gives them.

The wrapper (github.com/kijai/ComfyUI-WanVideoWrapper) runs LongCat-Video as its `WanModel` with
`is_longcat`: the checkpoint it loads has Wan-style keys (`blocks.0.self_attn.k.weight`,
`blocks.0.ffn.w1.weight`), fused q|k|v and k|v split into separate linears, the block's adaLN
linear as `modulation.1`, the final layer as `head`, the timestep MLP as `time_embedding.mlp`
and the caption MLP as `text_embedding`. Its LoRA loader (ComfyUI's `load_lora` on the keys of
that model's state dict under `diffusion_model.`) matches a LoRA module only by those names.
"""

from __future__ import annotations

import re

from ..release_facts import BLOCK_LINEARS

BLOCK_NAMES: dict[str, tuple[str, ...]] = {
    "adaLN_modulation.1": ("modulation.1",),
    "attn.qkv": ("self_attn.q", "self_attn.k", "self_attn.v"),
    "attn.proj": ("self_attn.o",),
    "cross_attn.q_linear": ("cross_attn.q",),
    "cross_attn.kv_linear": ("cross_attn.k", "cross_attn.v"),
    "cross_attn.proj": ("cross_attn.o",),
    "ffn.w1": ("ffn.w1",),
    "ffn.w2": ("ffn.w2",),
    "ffn.w3": ("ffn.w3",),
}
TOP_NAMES: dict[str, tuple[str, ...]] = {
    "t_embedder.mlp.0": ("time_embedding.mlp.0",),
    "t_embedder.mlp.2": ("time_embedding.mlp.2",),
    "y_embedder.y_proj.0": ("text_embedding.0",),
    "y_embedder.y_proj.2": ("text_embedding.2",),
    "final_layer.adaLN_modulation.1": ("head.modulation.1",),
    "final_layer.linear": ("head.head",),
}
if tuple(BLOCK_NAMES) != BLOCK_LINEARS:
    raise RuntimeError("wan_names.BLOCK_NAMES must name every linear of release_facts.BLOCK_LINEARS")

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_FROM_WAN = {wan: (ours, j, len(names)) for ours, names in {**BLOCK_NAMES, **TOP_NAMES}.items()
             for j, wan in enumerate(names)}


def wan_names(module: str) -> tuple[str, ...]:
    """The wrapper's name(s) of one of our linears (several for a fused layer, in row order)."""
    block = _BLOCK.match(module)
    if block:
        return tuple(f"blocks.{block[1]}.{name}" for name in BLOCK_NAMES[block[2]])
    return TOP_NAMES[module]


def longcat_name(wan: str) -> tuple[str, int, int] | None:
    """(our module, projection index, projections of that module) for a wrapper name; None when
    LongCat-Video has no such linear (a Wan-only module such as `cross_attn.k_img`)."""
    block = _BLOCK.match(wan)
    found = _FROM_WAN.get(block[2] if block else wan)
    if found is None or (block is None) != (found[0] in TOP_NAMES):
        return None
    ours, j, n = found
    return (f"blocks.{block[1]}.{ours}" if block else ours), j, n


def is_longcat_linear(module: str) -> bool:
    """Whether `module` names a linear of LongCat-Video (`blocks.N.attn.qkv`, `final_layer.linear`...)."""
    block = _BLOCK.match(module)
    return block[2] in BLOCK_NAMES if block else module in TOP_NAMES
