"""The transformer against the official implementation's reference outputs, and its loading rules."""

import json

import pytest
import torch

from longcat_train.release_facts import RELEASE_DIT_CONFIG
from longcat_train.model import WeightKeyError, LongCatVideoTransformer3DModel
from longcat_train.model.flops import transformer_flops

from .reference import load_reference, reference_model, rel_l2

RELEASE_CONFIG = RELEASE_DIT_CONFIG


def test_reference_state_dict_loads_strictly():
    tensors, config = load_reference()
    model = LongCatVideoTransformer3DModel(**config)
    dit = {k.removeprefix("dit."): v for k, v in tensors.items() if k.startswith("dit.")}
    result = model.load_state_dict(dit, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


@pytest.mark.parametrize(
    "case, timestep_key, use_mask, num_cond",
    [("t2v", "t2v.timestep", True, 0), ("i2v", "i2v.timestep", True, 1), ("nomask", "t2v.timestep", False, 0)],
)
def test_forward_matches_official_outputs(case, timestep_key, use_mask, num_cond):
    tensors, _ = load_reference()
    model = reference_model()
    with torch.no_grad():
        out = model(
            tensors["inputs.hidden_states"],
            tensors[timestep_key],
            tensors["inputs.encoder_hidden_states"],
            tensors["inputs.encoder_attention_mask"] if use_mask else None,
            num_cond_latents=num_cond,
        )
    assert out.dtype == torch.float32
    assert rel_l2(out, tensors[f"{case}.output"]) <= 1e-5


def test_condition_frames_ignore_noisy_frames_and_text():
    """Condition tokens attend only to condition tokens: changing later frames or the text leaves
    the condition frame's output unchanged, while the noisy frames do change."""
    tensors, _ = load_reference()
    model = reference_model()
    x = tensors["inputs.hidden_states"]
    ts, y, mask = tensors["i2v.timestep"], tensors["inputs.encoder_hidden_states"], tensors["inputs.encoder_attention_mask"]
    x2 = x.clone()
    x2[:, :, 1:] += torch.randn_like(x2[:, :, 1:])
    with torch.no_grad():
        a = model(x, ts, y, mask, num_cond_latents=1)
        b = model(x2, ts, y + 1.0, mask, num_cond_latents=1)
    assert torch.allclose(a[:, :, 0], b[:, :, 0], atol=1e-6)
    assert not torch.allclose(a[:, :, 1:], b[:, :, 1:], atol=1e-3)


def test_full_size_model_on_meta_device_allocates_nothing():
    with torch.device("meta"):
        model = LongCatVideoTransformer3DModel(**RELEASE_CONFIG)
    state = model.state_dict()
    assert len(state) == 1022
    assert sum(p.numel() for p in model.parameters()) == 13_581_071_424
    assert all(p.is_meta for p in model.parameters())
    assert list(model.buffers()) == []


def _write_sharded(tmp_path, model):
    folder = tmp_path / "ckpt" / "dit"
    model.save_pretrained(folder, max_shard_size="200KB", safe_serialization=True)
    assert len(list(folder.glob("diffusion_pytorch_model-*.safetensors"))) > 1
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").is_file()
    return folder


def test_sharded_fp32_checkpoint_loads_in_bf16(tmp_path):
    model = reference_model()
    _write_sharded(tmp_path, model)
    loaded = LongCatVideoTransformer3DModel.from_pretrained(tmp_path / "ckpt", subfolder="dit", torch_dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.to(torch.bfloat16)), key


def test_runtime_only_config_keys_are_accepted(tmp_path):
    _, config = load_reference()
    model = LongCatVideoTransformer3DModel(**config, enable_flashattn2=True, enable_bsa=False,
                                           bsa_params={"sparsity": 0.9}, cp_split_hw=[1, 1])
    assert model.config.cp_split_hw == [1, 1]


def test_wrong_or_missing_keys_name_themselves(tmp_path):
    folder = _write_sharded(tmp_path, reference_model())
    index_path = folder / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    # a config that disagrees with the weights: one more block than stored
    config = json.loads((folder / "config.json").read_text())
    config["depth"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightKeyError) as err:
        LongCatVideoTransformer3DModel.from_pretrained(tmp_path / "ckpt", subfolder="dit")
    assert "blocks.2.attn.qkv.weight" in str(err.value) and "missing keys" in str(err.value)
    # a mis-shaped tensor names the key, both shapes and the shard file
    config["depth"] = 2
    config["caption_channels"] = 32
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightKeyError) as err:
        LongCatVideoTransformer3DModel.from_pretrained(tmp_path / "ckpt", subfolder="dit")
    assert "y_embedder.y_proj.0.weight" in str(err.value) and "shape mismatches" in str(err.value)
    assert index["weight_map"]["y_embedder.y_proj.0.weight"] in str(err.value)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointing_modes_give_identical_gradients(mode):
    tensors, _ = load_reference()
    args = (tensors["inputs.hidden_states"], tensors["i2v.timestep"], tensors["inputs.encoder_hidden_states"],
            tensors["inputs.encoder_attention_mask"])

    def grads(checkpoint_mode):
        model = reference_model().train()
        model.set_activation_checkpointing(checkpoint_mode)
        model(*args, num_cond_latents=1).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, checkpointed = grads("none"), grads(mode)
    for name, grad in plain.items():
        assert torch.allclose(checkpointed[name], grad, rtol=1e-5, atol=1e-7), name


def test_flop_counter_scales_with_tokens():
    one = transformer_flops(RELEASE_CONFIG, 1, 24, 60, 104)
    two = transformer_flops(RELEASE_CONFIG, 2, 24, 60, 104)
    assert two.total == pytest.approx(2 * one.total)
    # 480x832x93: ~13.6B params x 37,440 tokens x 2 FLOPs ≈ 1.0 PFLOP of linear work, plus attention
    assert 1.2e15 < one.forward < 2.5e15
    sparse = transformer_flops(RELEASE_CONFIG, 1, 24, 60, 104, attention_density=0.0625)
    assert sparse.forward < one.forward


def test_selective_checkpointing_does_not_recompute_attention():
    from torch.utils._python_dispatch import TorchDispatchMode

    from longcat_train.model.attention import is_attention_op

    class CountAttention(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if is_attention_op(func):
                CountAttention.calls += 1
            return func(*args, **(kwargs or {}))

    tensors, _ = load_reference()
    args = (tensors["inputs.hidden_states"], tensors["t2v.timestep"], tensors["inputs.encoder_hidden_states"],
            tensors["inputs.encoder_attention_mask"])

    def attention_calls(mode):
        model = reference_model().train()
        model.set_activation_checkpointing(mode, keep_cross_attention=True)
        CountAttention.calls = 0
        with CountAttention():
            model(*args).square().mean().backward()
        return CountAttention.calls

    plain = attention_calls("none")
    assert plain > 0
    assert attention_calls("full") == 2 * plain  # recomputed in backward
    assert attention_calls("selective") == plain


def test_ulysses_cuts_token_rows_else_columns_and_refuses_what_it_cannot_share():
    from longcat_train.model.ulysses import band_axis

    assert band_axis((24, 30, 52), 32, 2) == 1  # 480x832: 30 token rows
    assert band_axis((24, 45, 80), 32, 8) == 2  # 720x1280: 45 rows, 80 columns
    with pytest.raises(ValueError, match="splits the 32 attention heads evenly"):
        band_axis((24, 45, 80), 32, 5)
    with pytest.raises(ValueError, match=r"token grid \(24, 45, 75\) .* has neither"):
        band_axis((24, 45, 75), 32, 2)
