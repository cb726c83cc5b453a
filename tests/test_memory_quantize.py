"""Quantized base weights: only the block linears are quantized, LoRA trains on top, and the
streamed loader builds the same model without ever holding the full bf16 copy."""

import pytest
import torch
from optimum.quanto import QLinear

from longcat_train.lora.adapters import add_lora
from longcat_train.memory import QuantizationError, load_quantized_transformer, quantize_transformer
from longcat_train.memory.quantize import QUANTIZED_LINEARS, is_quantized
from longcat_train.model import LongCatVideoTransformer3DModel

from .reference import reference_model
from .test_memory_offload import model_inputs

PRECISIONS = ["int8-quanto", "int4-quanto", "fp8-torchao"]


def _is_quantized_tensor(t: torch.Tensor) -> bool:
    return type(t) not in (torch.Tensor, torch.nn.Parameter)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_only_block_linears_are_quantized(precision):
    model = quantize_transformer(reference_model().to(torch.bfloat16), precision)
    for index, block in enumerate(model.blocks):
        for name in QUANTIZED_LINEARS:
            assert _is_quantized_tensor(block.get_submodule(name).weight), f"blocks.{index}.{name}"
    quantized = {n for n, p in model.named_parameters() if _is_quantized_tensor(p)}
    assert len(quantized) == len(model.blocks) * len(QUANTIZED_LINEARS)
    for name, p in model.named_parameters():
        if name not in quantized:  # norms, embedders, adaLN, final layer and the linears' biases
            assert p.dtype == torch.bfloat16 and not p.requires_grad, name
    assert all(not p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("precision", PRECISIONS)
def test_lora_trains_on_quantized_weights(precision):
    model = quantize_transformer(reference_model().to(torch.bfloat16), precision)
    torch.manual_seed(0)
    add_lora(model, rank=4)
    model.set_activation_checkpointing("full")
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params and all("lora_" in n for n in params)
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.AdamW(params.values(), lr=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**model_inputs()).float().pow(2).mean()
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in params.values())
    changed = [n for n, p in params.items() if not torch.equal(p, before[n])]
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)
    assert is_quantized(model)


@pytest.mark.parametrize("precision", ["int8-quanto", "fp8-torchao"])
def test_quantized_output_stays_close_to_bf16(precision):
    reference = reference_model().to(torch.bfloat16).eval()
    quantized = quantize_transformer(reference_model().to(torch.bfloat16).eval(), precision)
    with torch.no_grad():
        a, b = reference(**model_inputs()), quantized(**model_inputs())
    error = ((a - b).norm() / a.norm()).item()
    assert 0 < error < 0.1  # quantized, and still the same model


def test_streamed_loader_matches_quantizing_a_loaded_model(tiny_model):
    dit = tiny_model / "dit"
    loaded = LongCatVideoTransformer3DModel.from_pretrained(tiny_model, subfolder="dit",
                                                            torch_dtype=torch.bfloat16)
    expected = quantize_transformer(loaded, "int8-quanto").eval()
    streamed = load_quantized_transformer(dit, "int8-quanto", device="cpu").eval()
    assert not any(p.is_meta for p in streamed.parameters())
    assert isinstance(streamed.blocks[0].attn.qkv, QLinear)
    assert streamed.x_embedder.proj.weight.dtype == torch.bfloat16
    inputs = model_inputs()
    config = streamed.config
    g = torch.Generator().manual_seed(0)
    inputs["hidden_states"] = torch.randn(2, config.in_channels, 3, 4, 6, generator=g)
    inputs["encoder_hidden_states"] = torch.randn(2, 1, 8, config.caption_channels, generator=g)
    with torch.no_grad():
        assert torch.equal(streamed(**inputs), expected(**inputs))


def test_unquantized_precision_is_refused_by_name():
    with pytest.raises(QuantizationError, match="'bf16'"):
        quantize_transformer(reference_model(), "bf16")
