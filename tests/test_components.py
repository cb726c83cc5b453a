"""Loading the frozen components from the official layout, offline, and the latent statistics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
from transformers import UMT5EncoderModel

from longcat_train.components import (
    CheckpointError,
    ModelLayout,
    denormalize_latents,
    load_scheduler,
    load_text_encoder,
    load_tokenizer,
    load_vae,
    normalize_latents,
    vae_latent_stats,
)
from longcat_train.demo.tiny_model import TINY_DIT_CONFIG, write_tiny_model
from longcat_train.model import LongCatVideoTransformer3DModel

RELEASE_LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]
RELEASE_LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # Any attempt to reach the hub would fail loudly instead of silently downloading.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _copy_layout(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_layout_validates_the_tiny_checkpoint(tiny_model: Path) -> None:
    layout = ModelLayout(str(tiny_model))
    assert layout.missing() == []
    layout.validate()
    assert layout.vae == tiny_model / "vae"


def test_layout_names_every_missing_subfolder(tiny_model: Path, tmp_path: Path) -> None:
    root = _copy_layout(tiny_model, tmp_path / "ckpt")
    shutil.rmtree(root / "vae")
    (root / "scheduler" / "scheduler_config.json").unlink()
    layout = ModelLayout(root)
    assert layout.missing() == ["vae", "scheduler"]
    with pytest.raises(CheckpointError) as raised:
        layout.validate()
    problem, fix = str(raised.value).split("Fix:")
    assert "vae/" in problem and "scheduler/" in problem and "text_encoder/" not in problem
    assert "longcat demo" in fix
    with pytest.raises(CheckpointError, match="vae/"):
        load_vae(root)


def test_components_load_offline_from_tiny_layout(tiny_model: Path) -> None:
    vae = load_vae(tiny_model, dtype=torch.float32, device="cpu")
    assert isinstance(vae, AutoencoderKLWan)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    assert vae.config.scale_factor_temporal == 4 and vae.config.scale_factor_spatial == 8

    encoder = load_text_encoder(tiny_model, dtype=torch.bfloat16)
    assert isinstance(encoder, UMT5EncoderModel)
    assert next(encoder.parameters()).dtype == torch.bfloat16
    assert encoder.config.d_model == TINY_DIT_CONFIG["caption_channels"]

    tokenizer = load_tokenizer(tiny_model)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer("a cat walks", padding="max_length", max_length=16, truncation=True)["input_ids"]
    assert len(ids) == 16 and 1 in ids and ids[-1] == 0
    assert max(ids) < encoder.config.vocab_size
    # A trained vocabulary: common corpus words are not unknown tokens.
    assert tokenizer.unk_token_id not in tokenizer("the camera moves slowly")["input_ids"]

    scheduler = load_scheduler(tiny_model)
    assert isinstance(scheduler, FlowMatchEulerDiscreteScheduler)
    assert scheduler.config.shift == 12.0 and scheduler.config.num_train_timesteps == 1000


def test_dit_is_written_sharded_and_loads(tiny_model: Path) -> None:
    dit_dir = tiny_model / "dit"
    index = json.loads((dit_dir / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    assert all(name.startswith("diffusion_pytorch_model-0000") for name in shards)
    config = json.loads((dit_dir / "config.json").read_text())
    for key, value in TINY_DIT_CONFIG.items():
        assert config[key] == value, key
    dit = LongCatVideoTransformer3DModel.from_pretrained(dit_dir, local_files_only=True)
    assert dit.config.caption_channels == 32
    assert set(index["weight_map"]) == set(dit.state_dict())


def test_tiny_checkpoint_is_deterministic_per_seed(tiny_model: Path, tmp_path: Path) -> None:
    again = write_tiny_model(tmp_path / "again", seed=0)
    other = write_tiny_model(tmp_path / "other", seed=1)
    for relative in (
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "tokenizer/tokenizer.json",
        "dit/diffusion_pytorch_model.safetensors.index.json",
    ):
        assert (again / relative).read_bytes() == (tiny_model / relative).read_bytes(), relative
    assert (other / "vae/diffusion_pytorch_model.safetensors").read_bytes() != (
        tiny_model / "vae/diffusion_pytorch_model.safetensors"
    ).read_bytes()


def test_text_encoder_check_rejects_qwen_like_config(tiny_model: Path, tmp_path: Path) -> None:
    root = _copy_layout(tiny_model, tmp_path / "ckpt")
    config_path = root / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config.update({"model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"]})
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as raised:
        load_text_encoder(root)
    message = str(raised.value)
    assert "qwen2_5_vl" in message and "umT5-XXL" in message and "4096" in message
    assert "Qwen2.5-VL" in message and str(config_path) in message


def test_text_encoder_width_must_match_dit_caption_channels(tiny_model: Path, tmp_path: Path) -> None:
    root = _copy_layout(tiny_model, tmp_path / "ckpt")
    dit_config_path = root / "dit" / "config.json"
    dit_config = json.loads(dit_config_path.read_text())
    dit_config["caption_channels"] = 4096
    dit_config_path.write_text(json.dumps(dit_config))
    with pytest.raises(CheckpointError, match="caption_channels 4096"):
        load_text_encoder(root)


def test_latent_stats_come_from_the_vae_config(tiny_model: Path) -> None:
    vae = load_vae(tiny_model)
    mean, std = vae_latent_stats(vae)
    assert mean.shape == std.shape == (16,)
    torch.testing.assert_close(mean, torch.tensor(RELEASE_LATENTS_MEAN))
    torch.testing.assert_close(std, torch.tensor(RELEASE_LATENTS_STD))


def test_latent_stats_reject_a_config_without_them() -> None:
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
    vae.register_to_config(latents_std=[1.0] * 8)
    with pytest.raises(CheckpointError, match="latents_std"):
        vae_latent_stats(vae)


def test_normalize_follows_spec_and_inverts() -> None:
    mean = torch.tensor(RELEASE_LATENTS_MEAN)
    std = torch.tensor(RELEASE_LATENTS_STD)
    z = torch.randn(2, 16, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    normalized = normalize_latents(z, mean, std)
    channel = 5
    torch.testing.assert_close(normalized[:, channel], (z[:, channel] - mean[channel]) / std[channel])
    torch.testing.assert_close(denormalize_latents(normalized, mean, std), z)
    # Unbatched [C, T, H, W] works the same way; dtype is preserved.
    unbatched = normalize_latents(z[0].bfloat16(), mean, std)
    assert unbatched.dtype == torch.bfloat16
    torch.testing.assert_close(unbatched.float(), normalized[0], atol=0.05, rtol=0.02)


def test_dit_streamed_from_the_shards_equals_the_diffusers_load(tiny_model: Path) -> None:
    from longcat_train.model import LongCatVideoTransformer3DModel
    from longcat_train.model.loading import load_dit

    reference = LongCatVideoTransformer3DModel.from_pretrained(tiny_model, subfolder="dit").state_dict()
    as_stored = load_dit(tiny_model / "dit", None, "cpu")
    in_bf16 = load_dit(tiny_model / "dit", torch.bfloat16, "cpu")
    assert as_stored.state_dict().keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(as_stored.state_dict()[key], value), key
        assert torch.equal(in_bf16.state_dict()[key], value.to(torch.bfloat16)), key
    assert not any(p.requires_grad for p in in_bf16.parameters()) and not in_bf16.training
