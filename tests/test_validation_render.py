"""Renders on the tiny checkpoint: image-to-video keeps its start latent, seeds reproduce, LoRA
strengths act, and the mp4 / contact sheet come out as asked."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from longcat_train.cache import TextCache, collate_text
from longcat_train.components import load_text_encoder, load_tokenizer, load_vae
from longcat_train.lora import LoraWeights, apply_loras
from longcat_train.lora.formats import LoraModule
from longcat_train.model import LongCatVideoTransformer3DModel
from longcat_train.validation.outputs import contact_sheet, write_render
from longcat_train.validation.render import encode_condition, fit_pixels, render_video

SIZE = {"height": 64, "width": 64, "num_frames": 9, "steps": 2, "guidance": 4.0}


@pytest.fixture(scope="module")
def parts(tiny_model: Path):
    transformer = LongCatVideoTransformer3DModel.from_pretrained(tiny_model, subfolder="dit").eval()
    vae = load_vae(tiny_model)
    cache = TextCache(tiny_model, load_tokenizer(tiny_model), load_text_encoder(tiny_model))
    prompt, empty = cache.encode(["a cat walks across the kitchen", ""])
    ones = lambda e: torch.ones(e.shape[0], dtype=torch.long)  # noqa: E731
    text = (*collate_text([(prompt, ones(prompt))], max_len=512), *collate_text([(empty, ones(empty))], max_len=512))
    return transformer, vae, text


def _start_pixels(seed: int = 0) -> torch.Tensor:
    smooth = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return fit_pixels(smooth, 64, 64)


def test_image_to_video_keeps_the_start_latent_frame_bit_identical(parts) -> None:
    transformer, vae, text = parts
    start = _start_pixels()
    result = render_video(transformer, vae, *text, **SIZE, seed=1, start_pixels=start)
    assert result.latents.shape == (1, 16, 3, 8, 8)
    assert torch.equal(result.latents[:, :, :1], encode_condition(vae, start))
    noise_only = render_video(transformer, vae, *text, **SIZE, seed=1)
    assert not torch.equal(result.latents[:, :, 1:], noise_only.latents[:, :, 1:])
    assert result.frames.shape == (9, 64, 64, 3) and result.frames.dtype == np.uint8
    assert np.isfinite(result.first_frame_psnr) and noise_only.first_frame_psnr is None


def test_a_continuation_keeps_its_condition_latents_and_shows_its_condition_frames(parts) -> None:
    transformer, vae, text = parts
    frames = torch.cat([_start_pixels(seed) for seed in range(5)], dim=1)  # [3, 5, 64, 64]: 2 latent frames
    result = render_video(transformer, vae, *text, **SIZE, seed=1, condition_frames=frames)
    assert torch.equal(result.latents[:, :, :2], encode_condition(vae, frames))
    shown = torch.from_numpy(result.frames[:5]).permute(3, 0, 1, 2).float() / 127.5 - 1
    assert (shown - frames).abs().max() <= 1 / 127.5  # the given frames, not their VAE reconstruction
    assert result.first_frame_psnr is None
    with pytest.raises(ValueError, match=r"condition_frames must be \[3, 1 \+ 4·k, 64, 64\]"):
        render_video(transformer, vae, *text, **SIZE, seed=1, condition_frames=frames[:, :4])
    with pytest.raises(ValueError, match="leave no new frame"):
        render_video(transformer, vae, *text, **SIZE, seed=1, condition_frames=torch.cat([frames, frames[:, :4]], 1))


def test_a_seed_reproduces_a_render_and_another_seed_changes_it(parts) -> None:
    transformer, vae, text = parts
    first = render_video(transformer, vae, *text, **SIZE, seed=5)
    again = render_video(transformer, vae, *text, **SIZE, seed=5)
    other = render_video(transformer, vae, *text, **SIZE, seed=6)
    assert torch.equal(first.latents, again.latents) and np.array_equal(first.frames, again.frames)
    assert not torch.equal(first.latents, other.latents)


def test_lora_strength_scales_the_effect_and_zero_is_no_lora(parts) -> None:
    transformer, vae, text = parts
    generator = torch.Generator().manual_seed(0)
    modules = {}
    for name, module in transformer.named_modules():
        if name.endswith(("attn.proj", "ffn.w2")):
            out_features, in_features = module.weight.shape
            modules[name] = LoraModule(torch.randn(4, in_features, generator=generator) * 0.3,
                                       torch.randn(out_features, 4, generator=generator) * 0.3, alpha=4.0)
    lora = LoraWeights(modules)
    base = render_video(transformer, vae, *text, **SIZE, seed=2).latents
    renders = {}
    for strength in (0.0, 1.0, 2.0):
        handle = apply_loras(transformer, [(lora, strength)])
        try:
            renders[strength] = render_video(transformer, vae, *text, **SIZE, seed=2).latents
        finally:
            handle.remove()
    assert torch.equal(renders[0.0], base)
    assert not torch.equal(renders[1.0], base) and not torch.equal(renders[2.0], renders[1.0])
    assert torch.equal(render_video(transformer, vae, *text, **SIZE, seed=2).latents, base)  # hooks removed


def test_render_files_mp4_at_15_fps_and_contact_sheet(tmp_path: Path) -> None:
    frames = np.stack([np.full((32, 48, 3), 20 * i, dtype=np.uint8) for i in range(9)])
    files = write_render(tmp_path / "step_3", "00_demo", frames)
    with av.open(str(files.video)) as container:
        stream = container.streams.video[0]
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert stream.average_rate == 15
    assert len(decoded) == 9 and decoded[0].shape == (32, 48, 3)
    assert abs(int(decoded[4].mean()) - 80) <= 2  # frames stay in order
    sheet = np.asarray(Image.open(files.sheet))
    assert sheet.shape == (2 * 32, 4 * 48, 3)
    # 8 evenly spaced frames of 9, first and last included: 0 1 2 3 | 5 6 7 8
    assert [int(sheet[r * 32, c * 48, 0]) for r in range(2) for c in range(4)] == [0, 20, 40, 60, 100, 120, 140, 160]
    assert contact_sheet(frames[:3]).size == (3 * 48, 32)
