"""The official LongCat-Video sampler: shifted flow-matching Euler steps with CFG-Zero*.

Every render (periodic validation, `longcat validate`, the render benchmark) goes through
`denoise`, so the numbers match the reference pipeline in one place.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from longcat_train.model.step_cache import StepCache
from longcat_train.release_facts import FLOW_SHIFT

NUM_TRAIN_TIMESTEPS = 1000
DISTILL_GRID_STEPS = 50  # the cfg_step_lora was distilled on this 50-step grid
# The official video continuation (`generate_vc`, `enhance_hf`) keeps the shifted timesteps above
# 500 and ends with 10 uniform ones, 500, 450, …, 50, for sharper detail.
UNIFORM_TAIL_START = 500
UNIFORM_TAIL_STEPS = 10


def sampling_sigmas(num_inference_steps: int, distilled: bool = False) -> torch.Tensor:
    """Unshifted sigmas: `linspace(1, 0.001, N)`, or for the distilled LoRA the 50-step grid
    [1000, 980, …, 20]/1000 taken at floor(linspace(0, 50, N, endpoint=False))."""
    if not distilled:
        return torch.linspace(1.0, 0.001, num_inference_steps, dtype=torch.float32)
    stride = NUM_TRAIN_TIMESTEPS // DISTILL_GRID_STEPS
    grid = torch.arange(DISTILL_GRID_STEPS, 0, -1, dtype=torch.float32) * stride  # 1000 … 20
    picks = np.floor(np.linspace(0, DISTILL_GRID_STEPS, num_inference_steps, endpoint=False)).astype(np.int64)
    return grid[torch.from_numpy(picks)] / NUM_TRAIN_TIMESTEPS


def make_scheduler(num_inference_steps: int, shift: float = FLOW_SHIFT, distilled: bool = False,
                   device: torch.device | str = "cpu", uniform_tail: bool = False,
                   t_thresh: float = 0.0) -> FlowMatchEulerDiscreteScheduler:
    """A fresh diffusers scheduler holding the shifted schedule (σ' = shift·σ / (1 + (shift−1)·σ));
    with `uniform_tail`, the continuation schedule: the timesteps above `UNIFORM_TAIL_START`, then
    `UNIFORM_TAIL_STEPS` evenly spaced ones from there down (unshifted); with `t_thresh` > 0, the
    refinement schedule (`generate_refine`): t_thresh·1000, then the schedule's timesteps below it.
    Both hold σ = timestep / 1000."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)
    scheduler.set_timesteps(sigmas=sampling_sigmas(num_inference_steps, distilled).tolist(), device=device)
    timesteps = scheduler.timesteps
    if uniform_tail:
        tail = np.linspace(UNIFORM_TAIL_START, 0, UNIFORM_TAIL_STEPS, endpoint=False, dtype=np.float32)
        kept = timesteps[timesteps > UNIFORM_TAIL_START]
        _hold(scheduler, torch.cat([kept, torch.from_numpy(tail).to(kept.device)]))
    if t_thresh:
        start = torch.tensor(t_thresh * NUM_TRAIN_TIMESTEPS, dtype=timesteps.dtype, device=timesteps.device)
        _hold(scheduler, torch.cat([start[None], timesteps[timesteps < start]]))
    return scheduler


def _hold(scheduler: FlowMatchEulerDiscreteScheduler, timesteps: torch.Tensor) -> None:
    """Make the scheduler step along `timesteps` with σ = timestep / 1000 (set_timesteps would
    shift these sigmas; the scheduler steps along whatever it holds)."""
    scheduler.timesteps = timesteps
    scheduler.sigmas = torch.cat([timesteps / NUM_TRAIN_TIMESTEPS, timesteps.new_zeros(1)])


def cfg_zero_star(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """CFG-Zero*: scale the unconditional prediction by its optimal projection onto the conditional
    one, per sample over the whole flattened prediction, then apply guidance."""
    b = cond.shape[0]
    c, u = cond.reshape(b, -1), uncond.reshape(b, -1)
    scale = (c * u).sum(dim=1) / ((u * u).sum(dim=1) + 1e-8)
    scale = scale.view(b, *([1] * (cond.ndim - 1)))  # broadcasts for any batch size and rank
    return uncond * scale + guidance_scale * (cond - uncond * scale)


@torch.no_grad()
def denoise(
    transformer: torch.nn.Module,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    prompt_mask: Optional[torch.Tensor],
    negative_embeds: Optional[torch.Tensor],
    negative_mask: Optional[torch.Tensor],
    num_inference_steps: int,
    guidance_scale: float,
    num_cond_latents: int = 0,
    shift: float = FLOW_SHIFT,
    distilled: bool = False,
    continuation: bool = False,
    on_step: Optional[Callable[[int, int], None]] = None,
    cache_condition: bool = True,
    step_cache: Optional[StepCache] = None,
    t_thresh: float = 0.0,
) -> torch.Tensor:
    """Run the sampler from `latents` ([B,16,T,H,W], normalised; frames `:num_cond_latents` hold the
    clean condition latents) and return the denoised latents in float32. The condition frames are
    given timestep 0 and are never changed; `cache_condition` computes their keys and values once
    (`transformer.cache_condition`) and every step then runs the noisy frames only, as the official
    pipeline does (False: every step runs all frames; the same result to bf16 rounding). CFG runs
    only when guidance_scale > 1; the caller passes the empty prompt's embedding as the negative when
    the user gave none. `step_cache` (opt-in, approximate) lets steps skip the later blocks.

    `continuation` samples as the official video continuation (`generate_vc` with its defaults):
    its KV cache leaves the condition frames out of the prediction, so CFG-Zero*'s scale comes from
    the generated frames alone, and (unless `distilled`) the schedule ends in the uniform tail of
    `make_scheduler`. Image-to-video scales over every frame, as the official `generate_i2v`.
    `t_thresh` > 0 samples the refinement stage's truncated schedule (`make_scheduler`) from
    latents already noised to that level. `on_step(done, total)` follows the steps."""
    do_cfg = guidance_scale > 1.0
    if do_cfg and negative_embeds is None:
        raise ValueError("guidance_scale > 1 needs negative_embeds (encode the empty prompt \"\" when no "
                         "negative prompt is given)")
    dtype = next(transformer.parameters()).dtype
    latents = latents.float().clone()
    batch = latents.shape[0]
    scheduler = make_scheduler(num_inference_steps, shift, distilled, device=latents.device,
                               uniform_tail=continuation and not distilled, t_thresh=t_thresh)
    c = num_cond_latents
    first_guided = c if continuation else 0  # the frames CFG-Zero* scales over start here

    if do_cfg:
        embeds = torch.cat([negative_embeds.expand_as(prompt_embeds), prompt_embeds])
        if prompt_mask is None and negative_mask is None:
            mask = None
        else:
            ones = torch.ones(prompt_embeds.shape[:1] + prompt_embeds.shape[2:3], dtype=torch.long,
                              device=prompt_embeds.device)
            pos = ones if prompt_mask is None else prompt_mask
            neg = ones if negative_mask is None else negative_mask.expand_as(pos)
            mask = torch.cat([neg, pos])
    else:
        embeds, mask = prompt_embeds, prompt_mask

    # the condition frames' keys and values, computed once (they are the same at every step)
    condition = transformer.cache_condition(latents[:, :, :c]) if c and cache_condition else None
    for i, t in enumerate(scheduler.timesteps):
        frames = latents[:, :, c:] if condition is not None else latents
        model_in = torch.cat([frames, frames]) if do_cfg else frames
        timestep = t.expand(model_in.shape[0]).to(dtype)[:, None].repeat(1, model_in.shape[2])
        if condition is None:
            timestep[:, :c] = 0
        pred = transformer(model_in.to(dtype), timestep, embeds, mask, num_cond_latents=c, condition=condition,
                           step_cache=step_cache).float()
        if condition is None:
            pred = pred[:, :, first_guided:]
        elif not first_guided:  # image-to-video: the condition frames' output (the same in both CFG halves)
            pred = torch.cat([condition.prediction.repeat(pred.shape[0] // batch, 1, 1, 1, 1), pred], dim=2)
        if do_cfg:
            uncond, cond = pred.chunk(2)
            pred = cfg_zero_star(cond, uncond, guidance_scale)
        # the scheduler integrates dx/dσ = ε − x0, the negative of the model's x0 − ε
        noisy = pred[:, :, c - first_guided:]
        latents[:, :, c:] = scheduler.step(-noisy, t, latents[:, :, c:], return_dict=False)[0]
        if on_step is not None:
            on_step(i + 1, len(scheduler.timesteps))
    assert latents.shape[0] == batch
    return latents
