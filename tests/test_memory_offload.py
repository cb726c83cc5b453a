"""Block swapping and diffusers group offloading give the plain path's loss and LoRA gradients."""

import pytest
import torch

from longcat_train.lora.adapters import add_lora
from longcat_train.memory import GroupOffloadConflict, enable_block_swap, enable_group_offload, quantize_transformer

from longcat_train.model import LongCatVideoTransformer3DModel

from .reference import load_reference, reference_model


def lora_model(checkpointing: str = "full", dtype: torch.dtype = torch.float32):
    model = reference_model().to(dtype)
    torch.manual_seed(0)  # the same adapter initialisation in every model built here
    add_lora(model, rank=4, init="gaussian")
    with torch.no_grad():  # LoRA B starts at zero; give it values so gradients reach A as well
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.set_activation_checkpointing(checkpointing)
    return model.train()


def model_inputs():
    t, _ = load_reference()
    return dict(hidden_states=t["inputs.hidden_states"], timestep=t["i2v.timestep"],
                encoder_hidden_states=t["inputs.encoder_hidden_states"],
                encoder_attention_mask=t["inputs.encoder_attention_mask"], num_cond_latents=1)


def loss_and_grads(model):
    loss = model(**model_inputs()).float().pow(2).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def assert_same(expected, got):
    (loss0, grads0), (loss1, grads1) = expected, got
    assert torch.equal(loss0, loss1)
    assert grads0.keys() == grads1.keys() and len(grads0) > 0
    for name in grads0:
        assert torch.equal(grads0[name], grads1[name]), name


@pytest.mark.parametrize("checkpointing", ["full", "selective", "none"])
def test_block_swap_gives_the_plain_loss_and_lora_gradients(checkpointing):
    plain = loss_and_grads(lora_model(checkpointing))
    model = lora_model(checkpointing)
    swap = enable_block_swap(model, 2, device="cpu", offload_device="cpu")
    assert_same(plain, loss_and_grads(model))
    # forward fetches both blocks; a checkpointed backward refetches all but the last (kept for it)
    assert swap.transfers == (3 if checkpointing != "none" else 2)


def test_swapped_weights_return_to_their_host_copies_and_lora_stays_put():
    model = lora_model()
    lora_before = {n: p for n, p in model.named_parameters() if p.requires_grad}
    swap = enable_block_swap(model, 2, device="cpu", offload_device="cpu")
    qkv = model.blocks[1].attn.qkv.base_layer
    host_weight = next(s.host for s in swap.swapped[1].slots if s.owner is qkv and s.name == "weight")
    assert qkv.weight is host_weight
    loss_and_grads(model)
    # dropped once backward moved on to block 0: the host copy is back, nothing was copied out
    assert all(slot.owner._parameters.get(slot.name, slot.owner._buffers.get(slot.name)) is slot.host
               for slot in swap.swapped[1].slots)
    lora_after = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(lora_after[n] is p and p.grad is not None for n, p in lora_before.items())


def test_at_most_two_swapped_blocks_hold_device_copies():
    torch.manual_seed(0)
    _, config = load_reference()
    model = LongCatVideoTransformer3DModel(**dict(config, depth=6))
    add_lora(model, rank=4)
    model.set_activation_checkpointing("full")
    swap = enable_block_swap(model, 5, device="cpu", offload_device="cpu")
    in_flight = []
    for block in model.blocks:  # registered after the swap's hooks: sees the state they leave
        block.register_forward_pre_hook(
            lambda *_: in_flight.append(sum(e.on_device is not None for e in swap.swapped.values())))
    for _ in range(2):
        loss_and_grads(model)
    assert len(in_flight) == 2 * (6 + 6)  # forward and (early-stopped) recompute of every block, twice
    assert max(in_flight) == 2
    assert swap.transfers == 2 * (5 + 4)  # per step: forward fetches 5, backward refetches all but the last


def test_block_swap_trains_like_the_plain_path_over_optimizer_steps():
    def train(swap_blocks):
        model = lora_model()
        if swap_blocks:
            enable_block_swap(model, swap_blocks, device="cpu", offload_device="cpu")
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        for _ in range(2):
            loss_and_grads(model)
            optimizer.step()
            optimizer.zero_grad()
        return [p.detach().clone() for p in params]

    for a, b in zip(train(0), train(2)):
        assert torch.equal(a, b)


def test_block_swap_inference_matches_and_remove_restores():
    model = lora_model().eval()
    with torch.no_grad():
        expected = model(**model_inputs())
    swap = enable_block_swap(model, 2, device="cpu", offload_device="cpu")
    with torch.no_grad():
        assert torch.equal(model(**model_inputs()), expected)
    swap.remove()
    with torch.no_grad():
        assert torch.equal(model(**model_inputs()), expected)


def test_block_swap_with_int8_weights_matches_unswapped_int8():
    def quantized():
        model = reference_model().to(torch.bfloat16)
        quantize_transformer(model, "int8-quanto")
        torch.manual_seed(0)
        add_lora(model, rank=4, init="gaussian")
        model.set_activation_checkpointing("full")
        return model.train()

    plain = loss_and_grads(quantized())
    model = quantized()
    enable_block_swap(model, 2, device="cpu", offload_device="cpu")
    assert_same(plain, loss_and_grads(model))


def test_block_swap_rejects_impossible_counts():
    with pytest.raises(ValueError, match="musubi_blocks_to_swap=3"):
        enable_block_swap(lora_model(), 3, device="cpu")


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offload_through_diffusers_keeps_loss_and_gradients(offload_type):
    plain = loss_and_grads(lora_model())
    model = lora_model()
    enable_group_offload(model, "cpu", "cpu", offload_type, blocks_per_group=1)
    assert any(hasattr(m, "_diffusers_hook") for m in model.modules())  # the library's hooks are installed
    assert_same(plain, loss_and_grads(model))


def test_group_offload_refuses_what_it_cannot_be_combined_with():
    with pytest.raises(GroupOffloadConflict, match="training LoRA"):
        enable_group_offload(lora_model(), "cuda", "cpu")  # refused before anything touches CUDA
    swapped = lora_model()
    enable_block_swap(swapped, 1, device="cpu")
    with pytest.raises(GroupOffloadConflict, match="musubi_blocks_to_swap"):
        enable_group_offload(swapped, "cpu", "cpu")
    quantized = quantize_transformer(reference_model().to(torch.bfloat16), "int8-quanto")
    with pytest.raises(GroupOffloadConflict, match="quanto"):
        enable_group_offload(quantized, "cpu", "cpu")
    with pytest.raises(GroupOffloadConflict, match="group_offload_type"):
        enable_group_offload(reference_model(), "cpu", "cpu", "module_level")
