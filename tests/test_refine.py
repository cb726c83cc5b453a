"""The refinement stage against the official `generate_refine` run as an oracle
(tests/fixtures/make_official_reference.py: groups `refine`, image-to-video with temporal 2x, and
`refine_spatial`, no condition, spatial only; both with a refinement LoRA file)."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from longcat_train.lora import apply_loras, read_lora
from longcat_train.release_facts import REFINE_SIZES
from longcat_train.validation import denoise, make_scheduler
from longcat_train.validation.refine import REFINE_STEPS, REFINE_T_THRESH, RefineLayout, noised, refine_size, upsample_frames

from .reference import OFFICIAL_MODES_PATH, load_official_modes, reference_model, rel_l2

GROUPS = ("refine", "refine_spatial")


def _refinement_lora_file(tmp_path):
    """The fixture's refinement LoRA written back to the official-format file the oracle loaded."""
    tensors, _ = load_official_modes("refine")
    path = tmp_path / "refinement_lora.safetensors"
    save_file({k.removeprefix("lora."): v for k, v in tensors.items() if k.startswith("lora.")}, str(path))
    return path


def test_the_720p_size_is_the_official_choice_for_every_aspect_ratio():
    with safe_open(OFFICIAL_MODES_PATH, framework="pt") as f:
        probes = json.loads(f.metadata()["refine_sizes"])
    assert len(probes) >= 10
    for height, width, *official in probes:
        assert list(refine_size(height, width)) == official, (height, width)
    assert refine_size(480, 832) == (704, 1280)  # the release's 480p landscape render
    assert all(h % 64 == 0 and w % 64 == 0 for h, w in REFINE_SIZES)  # VAE 8 × patch 2 × BSA block 4


@pytest.mark.parametrize("group", GROUPS)
def test_upsampled_padded_frames_are_what_the_official_stage_encodes(group):
    t, settings = load_official_modes(group)
    spatial_only, num_cond = settings["spatial_refine_only"], settings["num_cond_frames"]
    video = upsample_frames(t["stage1_frames"].numpy(), settings["height"], settings["width"], temporal=not spatial_only)
    assert video.shape[1] == settings["stage1_frames"] * (1 if spatial_only else 2)
    layout = RefineLayout.of(video.shape[1], num_cond)
    encoded = t["encoder_inputs.0"][0]
    ours = layout.pad(video)[:, :, ::4, ::4]  # the fixture keeps every 4th row and column
    assert ours.shape == encoded.shape
    assert torch.allclose(ours, encoded, atol=1e-5)
    latents = t["init_latents"].shape[2]
    assert latents == 1 + (encoded.shape[1] - 1) // 4 and latents % 4 == 0
    c = layout.num_cond_latents
    assert c == (4 if num_cond else 0)
    if num_cond:  # the condition image, its first frame repeated in front to whole BSA blocks
        image = torch.from_numpy(t["condition_image"].numpy()).permute(2, 0, 1)[:, None].float() / 127.5 - 1
        condition = replace(layout, back=0).pad(image)[:, :, ::4, ::4]
        assert torch.allclose(condition, t["encoder_inputs.1"][0], atol=1e-6)
    # the noise mix at t_thresh (the condition latents then replace the first c frames)
    start = noised(t["normalized.0"], t["noise"], settings["t_thresh"])
    assert torch.allclose(start[:, :, c:], t["init_latents"][:, :, c:], atol=1e-6)


@pytest.mark.parametrize("group", GROUPS)
def test_refinement_sampling_with_the_lora_file_matches_the_official_generate_refine(group, tmp_path):
    t, settings = load_official_modes(group)
    assert (settings["t_thresh"], settings["num_inference_steps"]) == (REFINE_T_THRESH, REFINE_STEPS)
    c = 4 if settings["num_cond_frames"] else 0
    model = reference_model()
    args = (t["init_latents"], t["prompt_embeds"], t["prompt_mask"], None, None, REFINE_STEPS, 1.0)
    plain = denoise(model, *args, num_cond_latents=c, t_thresh=REFINE_T_THRESH)
    handle = apply_loras(model, [(read_lora(_refinement_lora_file(tmp_path)).weights, 1.0)])
    out = denoise(model, *args, num_cond_latents=c, t_thresh=REFINE_T_THRESH)
    handle.remove()
    assert rel_l2(out, t["output"]) <= 1e-5
    assert rel_l2(plain, t["output"]) > 1e-3  # the LoRA is part of what is compared
    assert torch.equal(out[:, :, :c], t["init_latents"][:, :, :c])
    scheduler = make_scheduler(REFINE_STEPS, t_thresh=REFINE_T_THRESH)
    assert torch.equal(scheduler.timesteps, t["timesteps"]) and torch.equal(scheduler.sigmas, t["sigmas"])
    assert scheduler.timesteps[0] == 500 and len(scheduler.timesteps) < REFINE_STEPS


def test_the_layout_pads_the_release_shape_to_whole_bsa_blocks():
    # 93 stage-1 frames doubled to 186; an image condition: 4 clean latents, then 48 noisy ones
    layout = RefineLayout.of(186, 1)
    assert (layout.num_cond_latents, layout.front) == (4, 12)
    total = layout.front + 186 + layout.back
    assert (total - 1) % 4 == 0 and (1 + (total - 1) // 4) % 4 == 0
    frames = torch.arange(5.0).view(1, 5, 1, 1)
    padded = RefineLayout(0, 2, 3).pad(frames)
    assert padded.flatten().tolist() == [0, 0, 0, 1, 2, 3, 4, 4, 4, 4]
    assert np.isclose(noised(torch.ones(1), torch.zeros(1), 0.5).item(), 0.5)
