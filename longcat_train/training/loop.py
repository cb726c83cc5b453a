"""`longcat train`: the LoRA training loop on Accelerate.

Read top to bottom: prepare data (caches) → load the frozen transformer → attach LoRA → optimizer
and schedule → resume → for each batch: latents, text, conditioning strategy, flow-matching loss,
backward, step → log, checkpoint, validate. Every random draw of the loop comes from one
`torch.Generator` whose state is checkpointed, and batches come from a plan that depends only on
(seed, epoch), so a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from rich.console import Console

from ..cache import collate_text
from ..components import load_dit_config, load_vae
from ..config import LoadedConfig, TrainingConfig
from ..data import BucketBatchSampler, ClipItem
from ..lora import add_lora, lora_state
from ..lora.adapters import compute_lora_in_autocast_dtype, load_lora_into_adapter
from ..memory import (
    PLANNED_KEYS,
    QUANTIZED_PRECISIONS,
    GroupOffloadConflict,
    MemoryPlan,
    MemorySettings,
    PlanRefusal,
    enable_block_swap,
    enable_group_offload,
    load_quantized_transformer,
    machine_memory_gib,
    offload_requests,
    plan_memory,
    planned_config_keys,
)
from ..model import LongCatVideoTransformer3DModel
from ..model.activation_offload import HOST_ARENA
from ..model.loading import load_dit
from ..model.flops import dense_bf16_peak_flops, transformer_flops
from ..validation.periodic import HeldOutLatents, Validator
from .checkpoint import (
    TrainState,
    load_checkpoint,
    prune_checkpoints,
    resolve_resume,
    save_checkpoint,
    save_rank_rng,
)
from ..objective.flow import sample_sigmas
from .prepare import PreparedData, prepare_data
from .progress import RunLog, peak_vram_gib, progress_bar, startup_table
from ..objective.loss import flow_matching_loss
from ..objective.strategy import choose_strategy
from .trackers import open_trackers
from .warmup import WarmupReport, WarmupSpec, start_kernel_warmup

MAX_CONSECUTIVE_NONFINITE = 3
EVENTS_FILE = "events.jsonl"  # in output_dir: one JSON line per step, checkpoint, validation


class TrainingStopped(RuntimeError):
    """A run that stopped on purpose (non-finite losses, out of memory) with its advice."""


@dataclass
class TrainResult:
    state: TrainState
    lora_path: Path
    losses: list[tuple[int, float]]


def load_transformer(cfg: TrainingConfig, device: torch.device) -> LongCatVideoTransformer3DModel:
    """The frozen DiT streamed from its shards: bf16 (or as stored, fp32, for `no_change`) straight
    onto the GPU, or into host RAM when block swap or group offload will place it; quantized
    block by block, so host RAM never holds a full bf16 copy."""
    dit = Path(cfg.pretrained_model_name_or_path) / "dit"
    placed_later = cfg.musubi_blocks_to_swap > 0 or cfg.enable_group_offload
    target = torch.device("cpu") if placed_later else device
    if cfg.base_model_precision in QUANTIZED_PRECISIONS:
        transformer = load_quantized_transformer(dit, cfg.base_model_precision, device=target, quantize_device=device)
    else:
        dtype = torch.bfloat16 if cfg.base_model_precision == "bf16" else None  # the release stores fp32
        transformer = load_dit(dit, dtype, target)
    transformer.set_attention_implementation(cfg.attention_implementation)
    transformer.set_activation_checkpointing(
        cfg.gradient_checkpointing_mode if cfg.gradient_checkpointing else "none",
        cfg.selective_checkpointing_blocks,
        offload_block_inputs=cfg.activation_offload and device.type == "cuda",
        keep_projections=cfg.keep_projections,
    )
    return transformer


def place_for_memory(transformer, cfg, device: torch.device) -> bool:
    """Block swap or group offload after LoRA exists; True when the model is placed already (so
    Accelerate must not move it)."""
    if cfg.musubi_blocks_to_swap:
        enable_block_swap(transformer, cfg.musubi_blocks_to_swap, device=device, offload_device=cfg.musubi_block_swap_device)
        return True
    if cfg.enable_group_offload:
        try:
            enable_group_offload(transformer, device, "cpu", cfg.group_offload_type,
                                 cfg.group_offload_blocks_per_group, cfg.group_offload_use_stream)
        except GroupOffloadConflict as conflict:
            raise TrainingStopped(str(conflict)) from conflict
        return True
    return False


def plan_memory_use(loaded: LoadedConfig, data: PreparedData, console: Console,
                    dit_config: dict) -> tuple[LoadedConfig, MemoryPlan | None, dict]:
    """On CUDA, before the model loads: the memory keys the config leaves unset take the fastest
    values that fit this GPU and this machine's RAM (`planned_config_keys`; returned as the third
    item), then every bucket is predicted, and a run predicted to run out of memory is refused
    unless `LONGCAT_IGNORE_MEMORY_PLAN=1`."""
    if not torch.cuda.is_available():
        return loaded, None, {}
    buckets = sorted({(i.bucket.height, i.bucket.width, i.bucket.num_frames) for i in data.items})
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    host_gib = machine_memory_gib()
    picked = planned_config_keys(loaded.training, buckets, gpu_gib, host_gib, dit_config)
    if picked:
        loaded = replace(loaded, training=loaded.training.model_copy(update=picked))
    plan = plan_memory(loaded.training, buckets, gpu_gib, dit_config, host_gib)
    plan.render(console)
    if os.environ.get("LONGCAT_IGNORE_MEMORY_PLAN") != "1":
        try:
            plan.raise_if_oom()
        except PlanRefusal as refusal:
            raise TrainingStopped(f"{refusal} (set LONGCAT_IGNORE_MEMORY_PLAN=1 to start anyway)") from refusal
    return loaded, plan, picked


def reserve_offload_memory(cfg: TrainingConfig, data: PreparedData, dit_config: dict | None,
                           device: torch.device) -> threading.Thread:
    """Pins the activation-offload arena for the largest bucket on a thread, alongside the model's
    loading: pinning tens of GiB of host memory takes seconds that the first step would pay."""
    requests = []
    if device.type == "cuda" and cfg.activation_offload:
        largest = max(data.items, key=lambda i: i.bucket.height * i.bucket.width * i.bucket.num_frames).bucket
        requests = offload_requests(MemorySettings.from_config(cfg), (largest.height, largest.width,
                                                                      largest.num_frames), dit_config)
    thread = threading.Thread(target=HOST_ARENA.reserve, args=(requests,), name="pin-offload-arena", daemon=True)
    thread.start()
    return thread


def start_warmup(cfg: TrainingConfig, data: PreparedData, dit_config: dict | None, device: torch.device):
    """On CUDA, the first step's kernel set-up (`warmup.py`) on a thread alongside loading: (thread,
    report), or None."""
    if device.type != "cuda" or dit_config is None:
        return None
    buckets = sorted({(i.bucket.height, i.bucket.width, i.bucket.num_frames) for i in data.items})
    image_to_video = any(i.is_i2v and i.i2v_probability > 0 for i in data.items)
    return start_kernel_warmup(WarmupSpec.from_config(cfg, dit_config, image_to_video), buckets, device)


def max_steps(cfg, batches_per_epoch: int) -> int:
    if cfg.max_train_steps:
        return cfg.max_train_steps
    return cfg.num_train_epochs * math.ceil(batches_per_epoch / cfg.gradient_accumulation_steps)


def assemble_batch(items: list[ClipItem], data: PreparedData, generator: torch.Generator, text_len: int | None):
    """Draws, in a fixed order from `generator`: the conditioning mode, caption dropout per item,
    then each clip latent from its cached posterior."""
    i2v_probability = sum(i.i2v_probability if i.is_i2v else 0.0 for i in items) / len(items)
    strategy = choose_strategy(i2v_probability, generator)
    texts = []
    for item in items:
        dropped = torch.rand((), generator=generator).item() < item.caption_dropout_probability
        texts.append(data.text("" if dropped else item.caption))
    x0 = torch.stack([data.clip_latent(item).sample(generator) for item in items])
    start = None
    if strategy.num_cond_latents:
        starts = [data.start_latent(item) for item in items]
        if all(s is not None for s in starts):
            start = torch.stack([s.mean for s in starts])
    embeds, mask = collate_text(texts, max_len=text_len)
    return strategy, x0, start, embeds, mask


def next_batch(sampler: BucketBatchSampler, state: TrainState) -> list[int]:
    """The next batch of the epoch plan, moving to the next epoch when one is used up; the position
    lives in `state`, so a resumed run continues with exactly the batch that was next."""
    batches = sampler.epoch_batches(state.epoch)
    while state.batches_in_epoch >= len(batches):
        state.epoch += 1
        state.batches_in_epoch = 0
        batches = sampler.epoch_batches(state.epoch)
    state.batches_in_epoch += 1
    return batches[state.batches_in_epoch - 1]


def step_metrics(model, items, x0, embeds, strategy, accumulation: int, seconds: float, gpu_peak: float | None):
    """Throughput figures of one optimizer step (model FLOPs without recomputation)."""
    T, H, W = x0.shape[2:]
    flops = transformer_flops(dict(model.config), len(items), T, H, W, embeds.shape[2],
                              strategy.num_cond_latents).total * accumulation
    metrics = {
        "perf/peak_vram_gib": peak_vram_gib(),
        "perf/tflop_per_step": flops / 1e12,
        "perf/tokens_per_s": len(items) * T * (H // 2) * (W // 2) * accumulation / seconds,
    }
    if gpu_peak:
        metrics["perf/mfu"] = flops / seconds / gpu_peak
    return metrics


def run_description(cfg, model, params, alpha, data: PreparedData, step: int, total_steps: int,
                    processes: int, picked: dict) -> dict[str, str]:
    """The startup table's rows: what is about to be trained, on what, with which memory settings."""
    checkpointing = cfg.gradient_checkpointing_mode if cfg.gradient_checkpointing else "off"
    rows = {
        "model": f"{cfg.model_family}/{cfg.model_flavour} at {cfg.pretrained_model_name_or_path}",
        "precision": f"weights {next(model.parameters()).dtype}, autocast {cfg.mixed_precision}",
        "trainable parameters": f"{sum(p.numel() for p in params):,} (LoRA rank {cfg.lora_rank}, alpha {alpha})",
        "datasets": ", ".join(f"{i}: {len(s.items)} items, {len(s.skipped)} skipped" for i, s in data.scans.items()),
        "buckets": ", ".join(sorted({i.bucket.label for i in data.items})),
        "steps": f"{step} → {total_steps} (batch {cfg.train_batch_size} × accumulation "
                 f"{cfg.gradient_accumulation_steps} × {processes} processes)",
        "memory": f"checkpointing {checkpointing}{', activation offload' if model.offload_block_inputs else ''}"
                  f"{', keeps ' + '+'.join(cfg.keep_projections) if cfg.keep_projections else ''}, "
                  f"swap {cfg.musubi_blocks_to_swap} blocks, attention {cfg.attention_implementation}",
    }
    if picked:
        rows["memory"] += ("; picked by the memory plan, as the config leaves them unset: "
                           + ", ".join(f"{key}={json.dumps(value)}" for key, value in picked.items()))
    return rows


def build_validator(loaded: LoadedConfig, data: PreparedData, device: torch.device):
    """The periodic validator, or None when nothing is to be validated. Only the main process
    renders; the others wait at the barrier after `run`."""
    cfg = loaded.training
    if not cfg.validation_step_interval or not (cfg.validation_prompt or data.eval_items):
        return None
    root = Path(cfg.pretrained_model_name_or_path)
    vae_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    heldout = [HeldOutLatents(data.clip_latent(i), data.start_latent(i)) for i in data.eval_items]
    return Validator(loaded, data.text_features, lambda: load_vae(root, dtype=vae_dtype, device=device),
                     data.eval_items, heldout)


def _set_seeds(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def run_training(loaded: LoadedConfig, console: Console | None = None) -> TrainResult:
    console = console or Console()
    cfg = loaded.training
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision if cfg.mixed_precision != "no" else "no",
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
    )
    if not accelerator.is_main_process:
        console = Console(quiet=True)  # one startup table and progress bar, not one per rank
    with accelerator.main_process_first():
        data = prepare_data(loaded, accelerator.device, console)
    cached_at = time.time()
    if not data.items:
        raise TrainingStopped("no usable training items: see the skipped files above (`longcat data check` lists them)")

    generator = _set_seeds(cfg.seed + accelerator.process_index)
    dit_config = load_dit_config(cfg.pretrained_model_name_or_path)
    loaded, plan, picked = plan_memory_use(loaded, data, console, dit_config)
    cfg = loaded.training
    pinning = reserve_offload_memory(cfg, data, dit_config, accelerator.device)
    warming = start_warmup(cfg, data, dit_config, accelerator.device)
    transformer = load_transformer(cfg, accelerator.device)
    weights_at = time.time()
    pinning.join()  # the time waited here is what pinning and warming up add to loading
    warmup = WarmupReport()
    if warming is not None:
        warming[0].join()
        warmup = warming[1]
        if warmup.error:
            console.print(f"[yellow]kernel warm-up failed ({warmup.error}); the first step sets up its kernels[/]")
    loaded_at = time.time()
    alpha = cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank
    add_lora(transformer, cfg.lora_rank, alpha, cfg.lora_target_modules, cfg.lora_dropout,
             "gaussian" if cfg.lora_init == "gaussian" else True)
    if accelerator.mixed_precision == "bf16":
        compute_lora_in_autocast_dtype(transformer)
    placed = place_for_memory(transformer, cfg, accelerator.device)
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
        eps=cfg.adam_epsilon, fused=accelerator.device.type == "cuda",
    )
    sampler = BucketBatchSampler(
        data.items, cfg.train_batch_size, cfg.seed, accelerator.num_processes, accelerator.process_index,
        probabilities={d.id: d.probability for d in loaded.datasets},
    )
    total_steps = max_steps(cfg, len(sampler.epoch_batches(0)))
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=total_steps)

    state = TrainState()
    resume = resolve_resume(output_dir, cfg.resume_from_checkpoint)
    if resume is not None:
        state, weights = load_checkpoint(resume, optimizer, lr_scheduler, generator, accelerator.process_index)
        load_lora_into_adapter(transformer, weights)
        console.print(f"resumed from {resume} at step {state.step}")
    transformer, optimizer, lr_scheduler = accelerator.prepare(
        transformer, optimizer, lr_scheduler, device_placement=[not placed, True, True]
    )
    model = accelerator.unwrap_model(transformer)
    model.train()
    text_len = 512 if model.config.text_tokens_zero_pad else None
    validator = build_validator(loaded, data, accelerator.device) if accelerator.is_main_process else None

    writer = None
    if accelerator.is_main_process:
        writer = open_trackers(cfg.report_to, output_dir, cfg.tracker_project_name, cfg.tracker_run_name,
                               cfg.model_dump(mode="json"))
    log = RunLog(writer=writer, events_path=output_dir / EVENTS_FILE if accelerator.is_main_process else None)
    log.event("start", step=state.step, total_steps=total_steps, cached_at=cached_at, weights_at=weights_at,
              loaded_at=loaded_at, ready_at=time.time(), **warmup.as_event(),
              memory={key: getattr(cfg, key) for key in PLANNED_KEYS}, picked=list(picked))
    console.print(startup_table(run_description(cfg, model, params, alpha, data, state.step, total_steps,
                                                accelerator.num_processes, picked)))

    config_hash = hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]

    def checkpoint() -> Path | None:
        """Every rank calls this: its RNG goes in, and all wait until the directory is published."""
        if not accelerator.is_main_process:
            save_rank_rng(output_dir, state.step, accelerator.process_index, generator)
        accelerator.wait_for_everyone()
        path = None
        if accelerator.is_main_process:
            weights = lora_state(accelerator.unwrap_model(transformer), alpha)
            meta = {"rank": cfg.lora_rank, "alpha": alpha, "targets": list(cfg.lora_target_modules),
                    "base_model": str(cfg.pretrained_model_name_or_path), "steps": state.step,
                    "config_hash": config_hash}
            path = save_checkpoint(output_dir, state, weights, meta, list(cfg.lora_export_formats), optimizer,
                                   lr_scheduler, generator, cfg.model_dump(mode="json"), accelerator.num_processes - 1)
            prune_checkpoints(output_dir, cfg.checkpoints_total_limit)
            log.write_loss_curve(output_dir / "loss.png")
            log.event("checkpoint", step=state.step, path=str(path))
        accelerator.wait_for_everyone()
        return path

    def validate() -> None:
        if validator is not None:
            started = time.time()
            metrics = validator.run(model, state.step, writer)
            log.event("validation", step=state.step, seconds=time.time() - started, **metrics)
            console.print("validation at step {}: {}".format(
                state.step, ", ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in metrics.items())))
        accelerator.wait_for_everyone()

    if cfg.validation_on_startup and state.step == 0:
        validate()
    gpu_peak = dense_bf16_peak_flops()
    nonfinite_in_row = 0
    with progress_bar(console) as bar:
        task = bar.add_task("train", total=total_steps, completed=state.step, status="")
        while state.step < total_steps:
            items = [data.items[i] for i in next_batch(sampler, state)]
            strategy, x0, start, embeds, mask = assemble_batch(items, data, generator, text_len)
            noise = torch.randn(x0.shape, generator=generator)
            sigmas = sample_sigmas(len(items), generator, cfg.flow_sigma_sampling, cfg.flow_schedule_shift or 12.0)
            device = accelerator.device
            with accelerator.accumulate(transformer):
                try:
                    with accelerator.autocast():
                        loss, _ = flow_matching_loss(
                            transformer, x0.to(device), noise.to(device), sigmas, embeds.to(device), mask.to(device),
                            strategy, None if start is None else start.to(device),
                        )
                except torch.cuda.OutOfMemoryError as error:
                    advice = plan.advice() if plan is not None else "try musubi_blocks_to_swap or int8-quanto"
                    raise TrainingStopped(
                        f"out of memory at step {state.step} (bucket {items[0].bucket.label}): {error}. The last "
                        f"checkpoint is intact. {advice}"
                    ) from error
                # decided together: a rank that skipped backward alone would hang the others' all-reduce
                nonfinite = accelerator.reduce(torch.tensor([float(not torch.isfinite(loss))], device=device), "sum")
                if nonfinite.item() > 0:
                    nonfinite_in_row += 1
                    state.nan_skipped += 1
                    optimizer.zero_grad(set_to_none=True)
                    console.print(f"[yellow]step {state.step}: loss is {loss.item()}, step skipped[/]")
                    if nonfinite_in_row >= MAX_CONSECUTIVE_NONFINITE:
                        path = checkpoint()
                        raise TrainingStopped(
                            f"{nonfinite_in_row} non-finite losses in a row; saved {path}. Try a lower "
                            "learning_rate, max_grad_norm 1.0, or base_model_precision bf16 instead of fp8."
                        )
                    continue
                nonfinite_in_row = 0
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    grad_norm = float(accelerator.clip_grad_norm_(params, cfg.max_grad_norm))
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            metrics = step_metrics(model, items, x0, embeds, strategy, cfg.gradient_accumulation_steps,
                                   log.last_seconds, gpu_peak)
            seconds = log.record(state.step, loss.item(), lr_scheduler.get_last_lr()[0], grad_norm, metrics)
            bar.update(task, completed=state.step, status=f"loss {log.ema:.4f} lr {lr_scheduler.get_last_lr()[0]:.2e} "
                       f"{seconds:.2f} s/step VRAM {peak_vram_gib():.1f} GiB")
            if state.step % cfg.checkpoint_step_interval == 0 or state.step == total_steps:
                checkpoint()
            if cfg.validation_step_interval and state.step % cfg.validation_step_interval == 0:
                validate()
            log.restart_clock()

    lora_path = output_dir / "lora.safetensors"
    final = output_dir / f"checkpoint-{state.step}"
    if not final.is_dir():  # e.g. resumed from a checkpoint in another directory at the last step
        checkpoint()  # every rank: it holds a barrier
    if accelerator.is_main_process:
        shutil.copyfile(final / "lora.safetensors", lora_path)
        log.event("done", step=state.step, lora=str(lora_path))
        console.print(f"done: {state.step} steps, final loss EMA {log.ema:.4f}, "
                      f"{state.nan_skipped} non-finite steps skipped; LoRA at {lora_path}")
    if writer is not None:
        writer.close()
    return TrainResult(state=state, lora_path=lora_path, losses=log.losses)
