"""Periodic validation: files, metrics and TensorBoard logs, and a training state left untouched."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from longcat_train.cache import LatentCache, TextCache
from longcat_train.components import load_text_encoder, load_tokenizer, load_vae
from longcat_train.data import load_clip_pixels, load_start_frame_pixels
from longcat_train.model import LongCatVideoTransformer3DModel
from longcat_train.objective.flow import shift_sigmas
from longcat_train.validation.command import _eval_items
from longcat_train.validation.periodic import HeldOutLatents, Validator, sigma_quantiles

from .media_factory import read_index, read_video, write_clip
from .validation_project import write_project


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    """The eval split with cached latents and every prompt's text features, built once."""
    root = tmp_path_factory.mktemp("validation_project")
    loaded = write_project(root, tiny_model, validation_using_datasets=True, eval_dataset_id="clips-val",
                           validation_num_inference_steps=1)
    items = _eval_items(loaded)
    latents = LatentCache(root / "vae_cache", load_vae(tiny_model))
    held_out = [
        HeldOutLatents(
            latents.get_or_encode(item.fingerprint(), lambda item=item: load_clip_pixels(item)),
            latents.get_or_encode(item.start_frame_fingerprint(), lambda item=item: load_start_frame_pixels(item),
                                  "start_frame"),
        )
        for item in items
    ]
    text = TextCache(root / "text_cache", load_tokenizer(tiny_model), load_text_encoder(tiny_model))
    features = {prompt: text.get(prompt) for prompt in Validator.required_prompts(loaded, items)}
    return loaded, items, held_out, features


@pytest.fixture()
def transformer(tiny_model: Path) -> LongCatVideoTransformer3DModel:
    return LongCatVideoTransformer3DModel.from_pretrained(tiny_model, subfolder="dit")


def test_run_writes_renders_logs_metrics_and_leaves_the_training_state_alone(
    project, transformer, tiny_model, tmp_path
) -> None:
    loaded, items, held_out, features = project
    # two eval clips, one render: the limit keeps validations short on large eval splits
    validator = Validator(loaded, features, lambda: load_vae(tiny_model), items, held_out, max_dataset_renders=1)
    transformer.train()
    transformer.blocks[0].eval()  # a mixed state must come back as it was, module by module
    modes = [m.training for m in transformer.modules()]
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    writer = SummaryWriter(tmp_path / "tb")

    first = validator.run(transformer, step=7, writer=writer)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in transformer.modules()] == modes
    second = validator.run(transformer, step=8)
    writer.close()

    step_dir = loaded.training.output_dir / "validation" / "step_7"
    assert sorted(p.name for p in step_dir.iterdir()) == [
        "00_a-blue-square-turns-green-0.mp4", "00_a-blue-square-turns-green-0.png",
    ]
    assert first == second  # same renders, same PSNR, same held-out loss
    for a in step_dir.glob("*.png"):  # the two steps' contact sheets, pixel for pixel
        b = step_dir.parent / "step_8" / a.name
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    assert set(first) == {"validation/first_frame_psnr", "validation/heldout_loss",
                          *(f"validation/heldout_loss_q{q}" for q in range(10, 100, 10))}
    assert all(np.isfinite(v) for v in first.values())

    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert events.Scalars("validation/heldout_loss")[0].value == pytest.approx(first["validation/heldout_loss"])
    assert "validation/00_a-blue-square-turns-green-0" in events.Tags()["images"]


def test_heldout_loss_follows_the_model_without_rendering(project, transformer, tiny_model) -> None:
    loaded, items, held_out, features = project
    no_renders = replace(loaded, training=loaded.training.model_copy(update={"validation_using_datasets": False,
                                                                             "validation_prompt": None}))

    def vae_loader():
        raise AssertionError("nothing to render: the VAE must not be loaded")

    validator = Validator(no_renders, features, vae_loader, items, held_out)
    before = validator.run(transformer, step=1)["validation/heldout_loss"]
    with torch.no_grad():
        transformer.final_layer.linear.weight.mul_(3.0)
    assert validator.run(transformer, step=2)["validation/heldout_loss"] != before


def test_a_validation_continuation_video_renders_its_continuation_in_place_of_the_prompt_alone(
    transformer, tiny_model, tmp_path
) -> None:
    clip = write_clip(tmp_path / "drive.mp4", count=12, fps=15, height=48, width=64)
    loaded = write_project(tmp_path, tiny_model, validation_continuation_video=str(clip),
                           validation_continuation_cond_frames=5, validation_resolution="32x32",
                           validation_num_inference_steps=1)
    text = TextCache(tmp_path / "text_cache", load_tokenizer(tiny_model), load_text_encoder(tiny_model))
    features = {prompt: text.get(prompt) for prompt in Validator.required_prompts(loaded)}
    validator = Validator(loaded, features, lambda: load_vae(tiny_model))
    assert validator.run(transformer, step=3) == {}  # no image-to-video render: no first-frame PSNR
    [video] = (loaded.training.output_dir / "validation" / "step_3").glob("*.mp4")
    frames, _ = read_video(video)
    assert video.name == "00_a-cat-walks-slowly.mp4" and frames.shape == (9, 32, 32, 3)
    assert [read_index(frame) for frame in frames[:5]] == [7, 8, 9, 10, 11]


def test_missing_text_features_are_named(project, tiny_model) -> None:
    loaded, items, _, _ = project
    empty = (torch.zeros(1, 32), torch.ones(1, dtype=torch.long))
    with pytest.raises(KeyError, match="a blue square turns green 0.*required_prompts"):
        Validator(loaded, {"": empty}, lambda: load_vae(tiny_model), items)


def test_sigma_quantiles_are_the_training_distribution_quantiles() -> None:
    uniform = sigma_quantiles("uniform", 12.0)
    assert torch.allclose(uniform, shift_sigmas(torch.arange(1, 10) / 10, 12.0))
    logit_normal = sigma_quantiles("logit_normal", 1.0)
    assert logit_normal[4] == pytest.approx(0.5) and torch.all(logit_normal.diff() > 0)
    assert logit_normal[0] == pytest.approx(torch.sigmoid(torch.tensor(-1.2815516)).item(), abs=1e-6)
