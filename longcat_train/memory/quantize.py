"""Quantized storage for the frozen DiT weights: int8/int4 (optimum-quanto) and fp8 (torchao).

Only the big linears inside each block are quantized (attn.qkv, attn.proj, cross_attn.*, ffn.*):
they hold 95 % of the weights. Norms, embedders, the adaLN modulation and the final layer stay in
bf16 — they are small and sit on the fp32 numerics path of the release.

Order matters for LoRA: quantize first, then `add_lora`. PEFT wraps a quanto `QLinear` as an ordinary
`nn.Linear` (it is a subclass) and torchao tensors through its own `TorchaoLoraLinear`; quantizing
after LoRA would hand quanto trainable base weights, whose backward path fails.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..config.training import DEFAULT_LORA_TARGETS
from ..model import LongCatVideoTransformer3DModel
from ..model.loading import load_dit
from ..release_facts import TEXT_TOKENS

QUANTIZED_PRECISIONS = ("int8-quanto", "int4-quanto", "fp8-torchao")
UNQUANTIZED_PRECISIONS = ("bf16", "no_change")
# the linears of a block that get quantized: the LoRA targets, i.e. every big matmul of a block
QUANTIZED_LINEARS: tuple[str, ...] = DEFAULT_LORA_TARGETS


class QuantizationError(ValueError):
    pass


def _check_precision(precision: str) -> None:
    if precision not in QUANTIZED_PRECISIONS:
        raise QuantizationError(
            f"base_model_precision={precision!r} is not a quantized mode; choose one of {QUANTIZED_PRECISIONS} "
            f"(or {UNQUANTIZED_PRECISIONS} for unquantized weights)"
        )


def quantize_block(block: nn.Module, precision: str) -> None:
    """Quantize one block's big linears in place (on whatever device the block is on) and freeze them."""
    _check_precision(precision)
    if precision == "fp8-torchao":
        from torchao.quantization import Float8WeightOnlyConfig, quantize_

        # weight-only: activations stay bf16, so LoRA's input and the fp32 islands are untouched
        quantize_(block, Float8WeightOnlyConfig(),
                  filter_fn=lambda module, name: isinstance(module, nn.Linear) and name in QUANTIZED_LINEARS)
    else:
        from optimum.quanto import freeze, qint4, qint8, quantize

        quantize(block, weights=qint8 if precision == "int8-quanto" else qint4, include=list(QUANTIZED_LINEARS))
        freeze(block)
    block.requires_grad_(False)  # quanto's backward would otherwise compute weight gradients


def quantize_transformer(model: LongCatVideoTransformer3DModel, precision: str) -> LongCatVideoTransformer3DModel:
    """Quantize an already loaded transformer block by block. Host/GPU memory peaks at the loaded
    model plus one block's quantized copy; use `load_quantized_transformer` to never hold the full
    bf16 model."""
    _check_precision(precision)
    for block in model.blocks:
        quantize_block(block, precision)
    model.requires_grad_(False)  # the base model is frozen; LoRA (added after) is what trains
    return model


def fp8_matmuls_unavailable(device: torch.device) -> str | None:
    """Why `use_fp8_matmuls` cannot run on `device`, or None when it can."""
    if device.type != "cuda":
        return f"FP8 matmuls need a CUDA GPU (this render runs on {device.type})"
    if torch.cuda.get_device_capability(device) < (8, 9):
        return f"FP8 matmuls need an Ada or Hopper GPU or newer ({torch.cuda.get_device_name(device)} has no FP8 tensor cores)"
    return None


def use_fp8_matmuls(model: LongCatVideoTransformer3DModel) -> None:
    """Renders, opt-in and approximate: every block's big linears become FP8 matmuls (torchao's
    float8 weights, activations scaled per row as they come). The weights take half the memory; the
    GEMMs run at twice the bf16 rate on Hopper, but quantizing the activations costs about what
    that saves at 480p (docs/benchmarks.md). Attention and the fp32 islands are untouched. Give it
    the bf16 model."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    for block in model.blocks:
        quantize_(block, config,
                  filter_fn=lambda module, name: isinstance(module, nn.Linear) and name in QUANTIZED_LINEARS)
    model.requires_grad_(False)


def is_quantized(model: nn.Module) -> bool:
    """True when any parameter is a quantized tensor subclass (quanto or torchao)."""
    return any(type(p) not in (torch.Tensor, nn.Parameter) for p in model.parameters())


def load_quantized_transformer(
    dit_folder: str | Path,
    precision: str,
    device: str | torch.device = "cpu",
    quantize_device: str | torch.device | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> LongCatVideoTransformer3DModel:
    """The transformer streamed from the safetensors files (`load_dit`), each block read in `dtype`
    onto `quantize_device` (default `device`), quantized there, then moved to `device`. Host RAM
    therefore never holds more than one block unquantized (the release stores fp32: one block is
    ~1.1 GiB while read). int4 packs its weights for the device it is quantized on, so quantize on
    the GPU that will train (`quantize_device="cuda"`) even when `device="cpu"` (weights that block
    swapping will place)."""
    _check_precision(precision)
    return load_dit(dit_folder, dtype, device, block_hook=lambda block: quantize_block(block, precision),
                    block_device=quantize_device)



def load_frozen_transformer(dit_folder: str | Path, precision: str, device: str | torch.device,
                            quantize_device: str | torch.device | None = None) -> LongCatVideoTransformer3DModel:
    """The frozen DiT in a `base_model_precision`: bf16, as stored (`no_change`; the release stores
    fp32), or quantized block by block as it streams in (on `quantize_device`), placed on `device`.
    What `train` and `validate` both load."""
    if precision in QUANTIZED_PRECISIONS:
        return load_quantized_transformer(dit_folder, precision, device=device, quantize_device=quantize_device)
    return load_dit(dit_folder, torch.bfloat16 if precision == "bf16" else None, device)

def relative_block_error(precision: str, device: str = "cuda", tokens_grid: tuple[int, int, int] = (24, 30, 52),
                         text_tokens: int = TEXT_TOKENS, seed: int = 0) -> float:
    """Relative L2 error of one full-size block's output with `precision` weights against the same
    block in bf16 (random release-shaped weights, I2V with one condition frame, 37,440 tokens by
    default: the 480x832x93 bucket). For the GPU benchmark."""
    from ..model.release import random_transformer

    model = random_transformer(device, torch.bfloat16, depth=1, seed=seed)
    model.set_attention_implementation("auto")
    block = model.blocks[0]
    g = torch.Generator(device=device).manual_seed(seed)
    T, H, W = tokens_grid
    C = model.config.hidden_size
    x = torch.randn(1, T * H * W, C, generator=g, device=device, dtype=torch.bfloat16)
    t_emb = torch.randn(1, T, model.config.adaln_tembed_dim, generator=g, device=device)
    text = torch.randn(1, text_tokens, C, generator=g, device=device, dtype=torch.bfloat16)
    args = (t_emb, text, None, tokens_grid, 1, model.rope, model.attention)
    with torch.no_grad():
        reference = block(x, *args).float()
        quantize_block(block, precision)
        quantized = block(x, *args).float()
    return ((quantized - reference).norm() / reference.norm()).item()
