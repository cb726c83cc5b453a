"""The sampler against the official pipeline's reference outputs."""

import pytest
import torch

from longcat_train.model.step_cache import StepCache
from longcat_train.validation import cfg_zero_star, denoise, make_scheduler

from .reference import load_official_modes, load_reference, reference_model, rel_l2


@pytest.mark.parametrize("case, num_cond", [("i2v", 1), ("t2v", 0)])
def test_denoise_matches_official_sampler(case, num_cond):
    t, _ = load_reference()
    init = t["sampler.init_latents"]
    out = denoise(
        reference_model(), init,
        t["inputs.encoder_hidden_states"][:1], t["inputs.encoder_attention_mask"][:1],
        t["sampler.negative_embeds"], t["sampler.negative_mask"],
        num_inference_steps=4, guidance_scale=4.0, num_cond_latents=num_cond,
    )
    assert rel_l2(out, t[f"sampler.{case}.output"]) <= 1e-5
    assert torch.equal(make_scheduler(4).timesteps, t[f"sampler.{case}.timesteps"])


def test_distilled_sampling_matches_the_official_distilled_image_to_video_loop():
    t, settings = load_official_modes("distill_i2v")
    assert (settings["use_distill"], settings["guidance_scale"], settings["num_inference_steps"]) == (True, 1.0, 16)
    out = denoise(reference_model(), t["init_latents"], t["prompt_embeds"], t["prompt_mask"], None, None,
                  num_inference_steps=16, guidance_scale=1.0, num_cond_latents=1, distilled=True)
    assert rel_l2(out, t["output"]) <= 1e-5
    assert torch.equal(out[:, :, :1], t["init_latents"][:, :, :1])
    scheduler = make_scheduler(16, distilled=True)
    assert torch.equal(scheduler.timesteps, t["timesteps"]) and torch.equal(scheduler.sigmas, t["sigmas"])


def test_continuation_matches_the_official_video_continuation_loop():
    t, settings = load_official_modes("continuation")
    cond = settings["num_cond_latents"]
    assert cond >= 2 and settings["use_kv_cache"] and settings["enhance_hf"]
    out = denoise(reference_model(), t["init_latents"], t["prompt_embeds"], t["prompt_mask"], t["negative_embeds"],
                  t["negative_mask"], settings["num_inference_steps"], settings["guidance_scale"],
                  num_cond_latents=cond, continuation=True)
    assert rel_l2(out, t["output"]) <= 1e-5
    assert torch.equal(out[:, :, :cond], t["init_latents"][:, :, :cond])
    scheduler = make_scheduler(settings["num_inference_steps"], uniform_tail=True)
    assert torch.equal(scheduler.timesteps, t["timesteps"]) and torch.equal(scheduler.sigmas, t["sigmas"])


def test_distilled_continuation_keeps_the_distilled_schedule():
    steps = []
    t, _ = load_official_modes("continuation")
    denoise(reference_model(), t["init_latents"], t["prompt_embeds"], t["prompt_mask"], None, None, 16, 1.0,
            num_cond_latents=2, distilled=True, continuation=True, on_step=lambda done, total: steps.append(total))
    assert steps == [16] * 16  # the official distilled continuation runs without the uniform tail


def test_image_to_video_never_changes_the_first_latent_frame():
    t, _ = load_reference()
    init = t["sampler.init_latents"]
    out = denoise(reference_model(), init, t["inputs.encoder_hidden_states"][:1], None,
                  t["sampler.negative_embeds"], None, 3, 4.0, num_cond_latents=1)
    assert torch.equal(out[:, :, 0], init[:, :, 0])
    assert not torch.equal(out[:, :, 1:], init[:, :, 1:])


@pytest.mark.parametrize("name, steps, distilled", [("default50", 50, False), ("distill16", 16, True)])
def test_schedules_equal_the_reference_exactly(name, steps, distilled):
    t, _ = load_reference()
    scheduler = make_scheduler(steps, distilled=distilled)
    assert torch.equal(scheduler.sigmas, t[f"schedule.{name}.sigmas"])
    assert torch.equal(scheduler.timesteps, t[f"schedule.{name}.timesteps"])


def test_cfg_zero_star_is_per_sample_for_any_batch():
    cond, uncond = torch.randn(3, 16, 2, 4, 4), torch.randn(3, 16, 2, 4, 4)
    batched = cfg_zero_star(cond, uncond, 4.0)
    single = torch.cat([cfg_zero_star(cond[i : i + 1], uncond[i : i + 1], 4.0) for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-6)


def test_batched_render_equals_single_renders():
    t, _ = load_reference()
    model = reference_model()
    init = torch.cat([t["sampler.init_latents"], t["sampler.init_latents"].flip(-1)])
    y, m = t["inputs.encoder_hidden_states"], t["inputs.encoder_attention_mask"]
    neg, neg_m = t["sampler.negative_embeds"], t["sampler.negative_mask"]
    both = denoise(model, init, y, m, neg.expand(2, -1, -1, -1), neg_m.expand(2, -1), 2, 4.0, num_cond_latents=1)
    for i in range(2):
        one = denoise(model, init[i : i + 1], y[i : i + 1], m[i : i + 1], neg, neg_m, 2, 4.0, num_cond_latents=1)
        assert rel_l2(both[i : i + 1], one) < 1e-5


def test_guidance_above_one_without_negative_is_a_clear_error():
    t, _ = load_reference()
    with pytest.raises(ValueError, match="empty prompt"):
        denoise(reference_model(), t["sampler.init_latents"], t["inputs.encoder_hidden_states"][:1], None,
                None, None, 2, 4.0)


@pytest.mark.parametrize("num_cond, guidance, continuation", [(1, 4.0, False), (2, 4.0, False), (2, 1.0, False),
                                                            (2, 4.0, True)])
def test_cached_condition_frames_give_the_uncached_render(num_cond, guidance, continuation):
    """The condition frames' keys and values computed once per render (each step then runs the
    noisy frames only) give the render of the full forward at every step."""
    t, _ = load_reference()
    model = reference_model()
    args = (model, t["sampler.init_latents"], t["inputs.encoder_hidden_states"][:1], t["inputs.encoder_attention_mask"][:1],
            t["sampler.negative_embeds"], t["sampler.negative_mask"], 3, guidance)
    cached = denoise(*args, num_cond_latents=num_cond, cache_condition=True, continuation=continuation)
    full = denoise(*args, num_cond_latents=num_cond, cache_condition=False, continuation=continuation)
    assert rel_l2(cached, full) <= 1e-6
    assert torch.equal(cached[:, :, :num_cond], t["sampler.init_latents"][:, :, :num_cond])


def test_a_cached_condition_runs_only_the_noisy_frames():
    t, _ = load_reference()
    model = reference_model()
    seen = []
    model.x_embedder.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[2]))
    denoise(model, t["sampler.init_latents"], t["inputs.encoder_hidden_states"][:1], None,
            t["sampler.negative_embeds"], None, 2, 4.0, num_cond_latents=1)
    assert seen == [1, 2, 2]  # the condition once, then the two noisy frames at each step


def test_the_step_cache_reuses_the_later_blocks_where_the_first_barely_moved():
    t, _ = load_reference()
    model = reference_model()
    args = (model, t["sampler.init_latents"], t["inputs.encoder_hidden_states"][:1], None,
            t["sampler.negative_embeds"], None, 4, 4.0)
    exact = denoise(*args, num_cond_latents=1)
    never = StepCache(1e-9)  # every step moves more than this: all computed, the exact render
    assert torch.equal(denoise(*args, num_cond_latents=1, step_cache=never), exact)
    assert (never.computed, never.skipped) == (4, 0)
    always = StepCache(1e9)  # after the first step, every step reuses the first step's residual
    cached = denoise(*args, num_cond_latents=1, step_cache=always)
    assert (always.computed, always.skipped) == (1, 3)
    assert torch.isfinite(cached).all() and not torch.equal(cached, exact)
    assert torch.equal(cached[:, :, 0], exact[:, :, 0])  # the condition frame stays fixed


def test_a_negative_step_cache_threshold_is_refused():
    with pytest.raises(ValueError, match="threshold"):
        StepCache(-0.1)
