"""`longcat train`: the LoRA training loop on Accelerate.

Read top to bottom: `TrainingRun` sets up (prepare data and caches → plan memory and load the
frozen transformer → attach LoRA → optimizer and schedule → resume), then `run_training` loops over
its phases: `step` (latents, text, conditioning strategy, flow-matching loss, backward, optimizer,
log), `checkpoint`, `validate`, and `finish`. Batches come from a stream planned from (seed, epoch)
alone, and every random draw made for a batch (conditioning mode, caption dropout, latent sample,
noise, σ, LoRA dropout) is seeded by its place in that stream: a resumed run repeats the
uninterrupted one exactly, and N processes × A accumulated batches train on the same samples with
the same draws as any other N·A (`data/sampler.py`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from rich.console import Console
from rich.markup import escape

from ..cache import collate_text
from ..components import load_dit_config, load_scheduler, load_vae
from ..config import LoadedConfig, TrainingConfig
from ..config.orientation import describe_size, orientation_warning
from ..config.problems import warnings_table
from ..data import BucketBatchSampler, ClipItem
from ..distributed import average_gradients, shard_frozen_weights
from ..lora.adapters import add_lora, compute_lora_in_autocast_dtype, load_lora_into_adapter, lora_state
from ..memory import (
    PLANNED_KEYS,
    GroupOffloadConflict,
    MemoryPlan,
    MemorySettings,
    PlanRefusal,
    enable_block_swap,
    enable_group_offload,
    load_frozen_transformer,
    machine_memory_gib,
    offload_requests,
    plan_memory,
    planned_config_keys,
)
from ..model import LongCatVideoTransformer3DModel
from ..model.activation_offload import HOST_ARENA
from ..model.ulysses import SequenceParallel
from ..model.flops import dense_bf16_peak_flops, transformer_flops
from ..release_facts import TEXT_TOKENS, latent_shape
from ..file_modes import write_aside
from ..run_lock import DirectoryInUse, hold_directory
from ..validation.periodic import HeldOutLatents, Validator
from .checkpoint import (
    CheckpointError,
    TrainState,
    check_room,
    config_mismatches,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    remove_leftovers,
    resolve_resume,
    save_checkpoint,
    save_rank_rng,
)
from ..objective.flow import sample_sigmas
from .prepare import PreparedData, prepare_data
from .loss_plot import write_loss_curve
from .progress import PlainProgress, RunLog, peak_vram_gib, progress_bar, startup_table
from ..objective.loss import flow_matching_loss
from ..objective.strategy import choose_strategy, drawn_strategy
from .interrupts import RunInterrupted, StopRequest, stop_on_signals
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


def load_transformer(cfg: TrainingConfig, device: torch.device, sharded: bool) -> LongCatVideoTransformer3DModel:
    """The frozen DiT streamed from its shards in the run's precision: straight onto the GPU, or into
    host RAM when block swap, group offload or FSDP (`sharded`) will place it (quantized on the GPU
    block by block, so host RAM never holds a full bf16 copy); then the run's attention and
    checkpointing settings."""
    placed_later = sharded or cfg.musubi_blocks_to_swap > 0 or cfg.enable_group_offload
    transformer = load_frozen_transformer(Path(cfg.pretrained_model_name_or_path) / "dit", cfg.base_model_precision,
                                          torch.device("cpu") if placed_later else device, quantize_device=device)
    transformer.set_attention_implementation(cfg.attention_implementation)
    transformer.set_activation_checkpointing(
        cfg.gradient_checkpointing_mode if cfg.gradient_checkpointing else "none",
        cfg.selective_checkpointing_blocks,
        offload_block_inputs=cfg.activation_offload and device.type == "cuda",
        keep_projections=cfg.keep_projections,
    )
    return transformer


def place_for_memory(transformer, cfg, device: torch.device, sharded: bool) -> bool:
    """FSDP, block swap or group offload after LoRA exists; True when the model is placed already
    (so Accelerate must not move it)."""
    if sharded:
        shard_frozen_weights(transformer, device)
        return True
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


def share_tokens(transformer: LongCatVideoTransformer3DModel, items: list[ClipItem]) -> SequenceParallel:
    """Ulysses over every process, checked against each bucket before the first step (a bucket the
    processes cannot cut would stop the run mid-way)."""
    shared = SequenceParallel()
    patch = transformer.config.patch_size
    try:
        for bucket in {item.bucket for item in items}:
            t, h, w = latent_shape(bucket.num_frames, bucket.height, bucket.width)
            shared.band((t, h // patch[1], w // patch[2]), transformer.config.num_heads)
    except ValueError as error:
        raise TrainingStopped(f"distributed_strategy ulysses: {error}") from None
    return shared


def plan_memory_use(loaded: LoadedConfig, data: PreparedData, console: Console,
                    dit_config: dict, processes: int) -> tuple[LoadedConfig, MemoryPlan | None, dict]:
    """On CUDA, before the model loads: the memory keys the config leaves unset take the fastest
    values that fit this GPU and this machine's RAM (`planned_config_keys`; returned as the third
    item), then every bucket is predicted, and a run predicted to run out of memory is refused
    unless `LONGCAT_IGNORE_MEMORY_PLAN=1`. `processes` train together (FSDP shares the weights out
    over them), the launcher's LOCAL_WORLD_SIZE of them on this machine."""
    if not torch.cuda.is_available():
        return loaded, None, {}
    buckets = sorted({(i.bucket.height, i.bucket.width, i.bucket.num_frames) for i in data.items})
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    host_gib = machine_memory_gib()
    on_machine = int(os.environ.get("LOCAL_WORLD_SIZE", processes))
    picked = planned_config_keys(loaded.training, buckets, gpu_gib, host_gib, dit_config, processes, on_machine)
    if picked:
        loaded = replace(loaded, training=loaded.training.model_copy(update=picked))
    plan = plan_memory(loaded.training, buckets, gpu_gib, dit_config, host_gib, processes, on_machine)
    plan.render(console)
    if os.environ.get("LONGCAT_IGNORE_MEMORY_PLAN") != "1":
        try:
            plan.raise_if_oom()
        except PlanRefusal as refusal:
            raise TrainingStopped(f"{refusal} (set LONGCAT_IGNORE_MEMORY_PLAN=1 to start anyway)") from refusal
    return loaded, plan, picked


def reserve_offload_memory(cfg: TrainingConfig, data: PreparedData, dit_config: dict | None,
                           device: torch.device, processes: int) -> threading.Thread:
    """Pins the activation-offload arena for the largest bucket on a thread, alongside the model's
    loading: pinning tens of GiB of host memory takes seconds that the first step would pay."""
    requests = []
    if device.type == "cuda" and cfg.activation_offload:
        largest = max(data.items, key=lambda i: i.bucket.height * i.bucket.width * i.bucket.num_frames).bucket
        requests = offload_requests(MemorySettings.from_config(cfg, processes), (largest.height, largest.width,
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
    spec = WarmupSpec.from_config(cfg, dit_config, drawn_strategy(data.items).name)
    return start_kernel_warmup(spec, buckets, device)


def max_steps(cfg, batches_per_epoch: int, batches_per_step: int) -> int:
    """`max_train_steps`, else the optimizer steps `num_train_epochs` of the batch stream take
    (`batches_per_step` = processes × gradient accumulation)."""
    if cfg.max_train_steps:
        return cfg.max_train_steps
    return math.ceil(cfg.num_train_epochs * batches_per_epoch / batches_per_step)


def assemble_batch(items: list[ClipItem], data: PreparedData, generator: torch.Generator, text_len: int | None):
    """Draws, in a fixed order from `generator`: the conditioning mode, caption dropout per item,
    then each clip latent from its cached posterior."""
    strategy = choose_strategy(items, generator)
    texts = []
    for item in items:
        dropped = torch.rand((), generator=generator).item() < item.caption_dropout_probability
        texts.append(data.text("" if dropped else item.caption))
    x0 = torch.stack([data.clip_latent(item).sample(generator) for item in items])
    start = None
    if strategy.start_frames:
        starts = [data.start_latent(item) for item in items]
        if all(s is not None for s in starts):
            start = torch.stack([s.mean for s in starts])
    embeds, mask = collate_text(texts, max_len=text_len)
    return strategy, x0, start, embeds, mask


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
    sharing = cfg.distributed_strategy if processes > 1 else "ddp"
    checkpointing = cfg.gradient_checkpointing_mode if cfg.gradient_checkpointing else "off"
    rows = {
        "model": f"{cfg.model_family}/{cfg.model_flavour} at {cfg.pretrained_model_name_or_path}",
        "precision": f"weights {next(model.parameters()).dtype}, autocast {cfg.mixed_precision}",
        "trainable parameters": f"{sum(p.numel() for p in params):,} (LoRA rank {cfg.lora_rank}, alpha {alpha})",
        "datasets": ", ".join(f"{i}: {len(s.items)} items, {len(s.skipped)} skipped"
                              + (f", {len(s.caption_warnings)} without caption" if s.caption_warnings else "")
                              for i, s in data.scans.items()),
        "buckets (HxWxF)": ", ".join(sorted({i.bucket.label for i in data.items})),
        "steps": f"{step} → {total_steps} (batch {cfg.train_batch_size} × accumulation "
                 + (f"{cfg.gradient_accumulation_steps}; each sample's tokens split over {processes} processes)"
                    if sharing == "ulysses" else f"{cfg.gradient_accumulation_steps} × {processes} processes)"),
        "validation": f"{describe_size(*cfg.validation_size)} × {cfg.validation_num_video_frames} frames"
                      + (", held-out clips in their own orientation" if cfg.validation_using_datasets else ""),
        "memory": f"checkpointing {checkpointing}{', activation offload' if model.offload_block_inputs else ''}"
                  f"{', keeps ' + '+'.join(cfg.keep_projections) if cfg.keep_projections else ''}, "
                  f"swap {cfg.musubi_blocks_to_swap} blocks, attention {cfg.attention_implementation}"
                  + (f", weights sharded over {processes} processes (FSDP)" if sharing == "fsdp" else ""),
    }
    if picked:
        rows["memory"] += ("; picked by the memory plan, as the config leaves them unset: "
                           + ", ".join(f"{key}={json.dumps(value)}" for key, value in picked.items()))
    return rows


def make_lr_scheduler(cfg: TrainingConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """The `lr_scheduler` schedule over `total_steps` optimizer steps (diffusers' `get_scheduler`)."""
    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                         num_training_steps=total_steps, num_cycles=cfg.lr_num_cycles, power=cfg.lr_power)


def validation_orientation_warning(loaded: LoadedConfig, data: PreparedData):
    """The warning when `validation_resolution` lies the other way from the held-out clips (or,
    without any, the training buckets), or None."""
    cfg = loaded.training
    reference, what = (data.eval_items, "the held-out clips") if data.eval_items else (data.items, "the training buckets")
    sizes = [(item.bucket.height, item.bucket.width) for item in reference]
    return orientation_warning(cfg.validation_resolution, cfg.validation_size, sizes, what, loaded.config_path)


def build_validator(loaded: LoadedConfig, data: PreparedData, device: torch.device, writes_renders: bool):
    """The periodic validator, or None when nothing is to be validated. Only the main process
    renders, unless the weights are sharded (then every process renders with the others, and the
    main one writes: `writes_renders`); the others wait at the barrier after `run`."""
    cfg = loaded.training
    if not cfg.validation_step_interval or not (cfg.validation_prompt or data.eval_items or loaded.prompt_entries):
        return None
    root = Path(cfg.pretrained_model_name_or_path)
    vae_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    heldout = [HeldOutLatents(data.clip_latent(i), data.start_latent(i)) for i in data.eval_items]
    return Validator(loaded, data.text_features, lambda: load_vae(root, dtype=vae_dtype, device=device),
                     data.eval_items, heldout, writes_renders=writes_renders)


def _set_seeds(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@dataclass
class LoadedModel:
    """The frozen DiT where it trains, with the memory settings that placed it and when each part
    of loading ended (the start event's timings)."""

    loaded: LoadedConfig  # with the memory keys the plan picked
    transformer: LongCatVideoTransformer3DModel
    plan: MemoryPlan | None
    picked: dict
    weights_at: float  # the weights are in place
    loaded_at: float  # pinning and kernel warm-up are done too
    warmup: WarmupReport


def load_model(loaded: LoadedConfig, data: PreparedData, device: torch.device, console: Console,
               sharded: bool, processes: int) -> LoadedModel:
    """Plan memory, then load the weights (into host RAM when FSDP will shard them: `sharded`) while
    the offload arena is pinned and the first step's kernels are set up on other threads."""
    dit_config = load_dit_config(loaded.training.pretrained_model_name_or_path)
    loaded, plan, picked = plan_memory_use(loaded, data, console, dit_config, processes)
    cfg = loaded.training
    pinning = reserve_offload_memory(cfg, data, dit_config, device, processes)
    warming = start_warmup(cfg, data, dit_config, device)
    transformer = load_transformer(cfg, device, sharded)
    weights_at = time.time()
    pinning.join()  # the time waited here is what pinning and warming up add to loading
    warmup = WarmupReport()
    if warming is not None:
        warming[0].join()
        warmup = warming[1]
        if warmup.error:
            console.print(f"[yellow]kernel warm-up failed ({warmup.error}); the first step sets up its kernels[/]")
    return LoadedModel(loaded, transformer, plan, picked, weights_at, time.time(), warmup)


class TrainingRun:
    """One `train` run, set up: data cached, model loaded with its LoRA, optimizer and schedule
    (resumed where a checkpoint says), logs open. One method per phase of the loop: `step`,
    `checkpoint`, `validate`, `finish`."""

    def __init__(self, loaded: LoadedConfig, console: Console, scope: contextlib.ExitStack) -> None:
        """`scope` holds what the run holds until it ends (the lock on `output_dir`)."""
        cfg = loaded.training
        self.output_dir = Path(cfg.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.accelerator = accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision if cfg.mixed_precision != "no" else "no",
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        )
        # one startup table and progress bar, not one per rank
        self.console = console if accelerator.is_main_process else Console(quiet=True)
        if accelerator.is_main_process:
            try:
                scope.enter_context(hold_directory(self.output_dir, "a training run"))
            except DirectoryInUse as error:
                raise TrainingStopped(f"{error}. Wait for it to end, or give this run another output_dir.") from None
        with accelerator.main_process_first():
            self.data = data = prepare_data(loaded, accelerator.device, self.console)
        cached_at = time.time()
        if not data.items:
            raise TrainingStopped("no usable training items: see the skipped files above "
                                  "(`longcat data check` lists them)")

        self.generator = _set_seeds(cfg.seed + accelerator.process_index)
        # FSDP or Ulysses over the processes; with one process there is nothing to share
        self.sharded = cfg.distributed_strategy == "fsdp" and accelerator.num_processes > 1
        self.sequence_shared = cfg.distributed_strategy == "ulysses" and accelerator.num_processes > 1
        model = load_model(loaded, data, accelerator.device, self.console, self.sharded, accelerator.num_processes)
        self.loaded, self.plan = model.loaded, model.plan
        self.cfg = cfg = model.loaded.training
        transformer = model.transformer
        self.alpha = cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank
        add_lora(transformer, cfg.lora_rank, self.alpha, cfg.lora_target_modules, cfg.lora_dropout,
                 "gaussian" if cfg.lora_init == "gaussian" else True)
        if accelerator.mixed_precision == "bf16":
            compute_lora_in_autocast_dtype(transformer)
        placed = place_for_memory(transformer, cfg, accelerator.device, self.sharded)
        if self.sequence_shared:
            transformer.set_sequence_parallel(share_tokens(transformer, data.items))
        self.params = [p for p in transformer.parameters() if p.requires_grad]
        if accelerator.is_main_process:  # it holds the output_dir lock: nothing else writes there
            for leftover in remove_leftovers(self.output_dir):
                self.console.print(f"removed {leftover.name}, left by a save or prune that was killed")
            # LoRA files (one per format) and AdamW's two moments, all float32
            checkpoint_bytes = sum(p.numel() for p in self.params) * 4 * (2 + len(cfg.lora_export_formats))
            try:
                check_room(self.output_dir, checkpoint_bytes)
            except CheckpointError as error:
                raise TrainingStopped(str(error)) from None
        optimizer = torch.optim.AdamW(
            self.params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon, fused=accelerator.device.type == "cuda",
        )
        # with Ulysses every process takes the same batches: they share its tokens
        replicas, replica = (1, 0) if self.sequence_shared else (accelerator.num_processes, accelerator.process_index)
        self.sampler = BucketBatchSampler(
            data.items, cfg.train_batch_size, cfg.seed, replicas, replica,
            probabilities={d.id: d.probability for d in loaded.datasets}, accumulation=cfg.gradient_accumulation_steps,
        )
        batches = len(self.sampler.epoch_plan(0))
        if batches == 0:
            sizes = Counter(item.bucket.label for item in data.items)
            raise TrainingStopped(
                f"no batch of train_batch_size={cfg.train_batch_size} can be formed: "
                "a batch takes its items from one bucket, and the buckets hold "
                + ", ".join(f"{label}: {count}" for label, count in sorted(sizes.items()))
                + " items. Lower train_batch_size, or add clips to one bucket")
        self.total_steps = max_steps(cfg, batches, self.sampler.batches_per_step)
        lr_scheduler = make_lr_scheduler(cfg, optimizer, self.total_steps)
        self.state = TrainState()
        try:
            resume = resolve_resume(self.output_dir, cfg.resume_from_checkpoint,
                                    warn=lambda message: self.console.print(f"[yellow]{escape(message)}[/]"))
        except CheckpointError as error:
            raise TrainingStopped(str(error)) from error
        if resume is not None:
            mismatches = config_mismatches(resume, cfg.model_dump(mode="json"))
            if mismatches:
                raise TrainingStopped(
                    f"cannot resume from {resume}: {'; '.join(mismatches)}. Either resume with the checkpoint's "
                    f"values (--set {' --set '.join(m.split(' in the checkpoint')[0] for m in mismatches)}), or "
                    "start a fresh run (another output_dir, or resume_from_checkpoint null)")
            self.state, weights = load_checkpoint(resume, optimizer, lr_scheduler, self.generator,
                                                  accelerator.process_index)
            try:
                self.sampler.load_state_dict(self.state.sampler)
            except ValueError as error:
                raise TrainingStopped(f"cannot resume from {resume}: {error}") from error
            load_lora_into_adapter(transformer, weights)
            self.console.print(f"resumed from {resume} at step {self.state.step}")
        # the schedule stays outside `prepare`: Accelerate's wrapper steps it once per process at each
        # optimizer step, which ran an N-process schedule N times too fast (its length is in steps)
        self.lr_scheduler = lr_scheduler
        if self.sharded:  # not wrapped in DDP: FSDP gathers the weights, `average_gradients` the LoRA's
            self.transformer, self.optimizer = transformer, accelerator.prepare(optimizer)
        else:
            self.transformer, self.optimizer = accelerator.prepare(transformer, optimizer,
                                                                   device_placement=[not placed, True])
        self.model = accelerator.unwrap_model(self.transformer)
        self.model.train()
        self.text_len = TEXT_TOKENS if self.model.config.text_tokens_zero_pad else None
        # σ shift: the config's, else the checkpoint scheduler's (as validation renders with)
        self.shift = cfg.flow_schedule_shift or float(load_scheduler(loaded.model_dir).config.shift)
        self.validator = (build_validator(self.loaded, data, accelerator.device, accelerator.is_main_process)
                          if accelerator.is_main_process or self.sharded else None)
        self.writer = None
        if accelerator.is_main_process:
            self.writer = open_trackers(cfg.report_to, self.output_dir, cfg.tracker_project_name,
                                        cfg.tracker_run_name, cfg.model_dump(mode="json"))
        self.log = RunLog(writer=self.writer,
                          events_path=self.output_dir / EVENTS_FILE if accelerator.is_main_process else None)
        self.log.ema = self.state.loss_ema
        self.log.event("start", step=self.state.step, total_steps=self.total_steps, cached_at=cached_at,
                       weights_at=model.weights_at, loaded_at=model.loaded_at, ready_at=time.time(),
                       **model.warmup.as_event(), memory={key: getattr(cfg, key) for key in PLANNED_KEYS},
                       picked=list(model.picked))
        orientation = validation_orientation_warning(loaded, data)
        if orientation is not None:
            self.console.print(warnings_table([orientation]))
        self.console.print(startup_table(run_description(cfg, self.model, self.params, self.alpha, data,
                                                         self.state.step, self.total_steps,
                                                         accelerator.num_processes, model.picked)))
        self.config_hash = hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]
        self.gpu_peak = dense_bf16_peak_flops()
        self.nonfinite_in_row = 0

    def step(self) -> bool:
        """One batch forward and backward; True when it completed an optimizer step (False while
        gradients accumulate, or when a non-finite loss skipped the batch)."""
        cfg, accelerator, state, generator = self.cfg, self.accelerator, self.state, self.generator
        batch = self.sampler.next_batch()
        items = [self.data.items[i] for i in batch.indices]
        # the batch's draws depend on its place in the stream, not on the rank drawing them
        generator.manual_seed(batch.seed)
        torch.manual_seed(batch.seed)  # LoRA dropout draws from the global generators
        strategy, x0, start, embeds, mask = assemble_batch(items, self.data, generator, self.text_len)
        noise = torch.randn(x0.shape, generator=generator)
        sigmas = sample_sigmas(len(items), generator, cfg.flow_sigma_sampling, self.shift)
        device = accelerator.device
        with accelerator.accumulate(self.transformer):
            try:
                with accelerator.autocast():
                    loss, _ = flow_matching_loss(
                        self.transformer, x0.to(device), noise.to(device), sigmas, embeds.to(device),
                        mask.to(device), strategy, None if start is None else start.to(device),
                    )
            except torch.cuda.OutOfMemoryError as error:
                advice = self.plan.advice() if self.plan is not None else "try musubi_blocks_to_swap or int8-quanto"
                raise TrainingStopped(
                    f"out of memory at step {state.step} (bucket {items[0].bucket.label}): {error}. The last "
                    f"checkpoint is intact. {advice}"
                ) from error
            # decided together: a rank that skipped backward alone would hang the others' all-reduce
            nonfinite = accelerator.reduce(torch.tensor([float(not torch.isfinite(loss))], device=device), "sum")
            if nonfinite.item() > 0:
                self._skip_nonfinite(loss)
                return False
            self.nonfinite_in_row = 0
            # Ulysses: each process's gradients cover its tokens, the sample's are their sum, and
            # DDP averages; FSDP: `average_gradients` below
            accelerator.backward(loss * accelerator.num_processes if self.sequence_shared else loss)
            if self.sharded and accelerator.sync_gradients:
                average_gradients(self.params)
            grad_norm = None
            if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                grad_norm = float(accelerator.clip_grad_norm_(self.params, cfg.max_grad_norm))
            self.optimizer.step()
            if accelerator.sync_gradients:  # once per optimizer step, not per accumulated batch
                self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            return False
        state.step += 1
        metrics = step_metrics(self.model, items, x0, embeds, strategy, cfg.gradient_accumulation_steps,
                               self.log.last_seconds, self.gpu_peak)
        self.log.record(state.step, loss.item(), self.lr_scheduler.get_last_lr()[0], grad_norm, metrics)
        return True

    def _skip_nonfinite(self, loss: torch.Tensor) -> None:
        self.nonfinite_in_row += 1
        self.state.nan_skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.console.print(f"[yellow]step {self.state.step}: loss is {loss.item()}, step skipped[/]")
        if self.nonfinite_in_row >= MAX_CONSECUTIVE_NONFINITE:
            path = self.checkpoint()
            raise TrainingStopped(
                f"{self.nonfinite_in_row} non-finite losses in a row; saved {path}. Try a lower "
                "learning_rate, max_grad_norm 1.0, or base_model_precision bf16 instead of fp8."
            )

    def checkpoint(self) -> Path | None:
        """Every rank calls this: its RNG goes in, and all wait until the directory is published."""
        accelerator, state, cfg = self.accelerator, self.state, self.cfg
        if not all(bool(torch.isfinite(p).all()) for p in self.params):  # every rank holds the same LoRA
            last = list_checkpoints(self.output_dir)
            raise TrainingStopped(
                f"the LoRA weights are not finite at step {state.step}; not saved. The last saved checkpoint is "
                f"{last[-1] if last else 'none'}. Try a lower learning_rate or max_grad_norm 1.0")
        state.sampler = self.sampler.state_dict()
        state.loss_ema = self.log.ema
        if not accelerator.is_main_process:
            save_rank_rng(self.output_dir, state.step, accelerator.process_index, self.generator)
        accelerator.wait_for_everyone()
        path = None
        if accelerator.is_main_process:
            weights = lora_state(accelerator.unwrap_model(self.transformer), self.alpha)
            meta = {"rank": cfg.lora_rank, "alpha": self.alpha, "targets": list(cfg.lora_target_modules),
                    "base_model": str(cfg.pretrained_model_name_or_path), "steps": state.step,
                    "config_hash": self.config_hash}
            path = save_checkpoint(self.output_dir, state, weights, meta, list(cfg.lora_export_formats),
                                   self.optimizer, self.lr_scheduler, self.generator, cfg.model_dump(mode="json"),
                                   accelerator.num_processes - 1)
            prune_checkpoints(self.output_dir, cfg.checkpoints_total_limit)
            self.log.event("checkpoint", step=state.step, path=str(path))
            self.plot_loss()
        accelerator.wait_for_everyone()
        return path

    def validate(self) -> None:
        """Renders and held-out loss on the main process (on all of them with sharded weights); the
        others wait at the barrier."""
        validator = self.validator
        if validator is not None:
            started = time.time()
            self.model.set_sequence_parallel(None)  # Ulysses: the main process renders whole samples alone
            metrics = validator.run(self.model, self.state.step, self.writer)
            self.model.set_sequence_parallel(SequenceParallel() if self.sequence_shared else None)
        if validator is not None and self.accelerator.is_main_process:
            self.log.event("validation", step=self.state.step, seconds=time.time() - started, **metrics)
            self.plot_loss()  # with the held-out point of this step
            self.console.print("validation at step {}: {}".format(
                self.state.step, ", ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in metrics.items())))
        self.accelerator.wait_for_everyone()

    def plot_loss(self) -> None:
        """`output_dir/loss.png` from the whole run's events (main process)."""
        write_loss_curve(self.output_dir / EVENTS_FILE, self.output_dir / "loss.png",
                         warn=lambda message: self.console.print(f"[yellow]{escape(message)}[/]"))

    def stop_agreed(self, stop: StopRequest) -> bool:
        """Whether any rank was asked to stop (all ranks must checkpoint at the same step)."""
        if self.accelerator.num_processes == 1:
            return stop.requested
        flag = torch.tensor([float(stop.requested)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, "sum").item() > 0)

    def stop(self, stop: StopRequest, saved: bool) -> None:
        """After the step a stop signal arrived in: its checkpoint (unless just written), how to
        resume, then `RunInterrupted`."""
        if not saved:
            self.checkpoint()
        path = self.output_dir / f"checkpoint-{self.state.step}"
        self.log.event("interrupted", step=self.state.step, signal=stop.name or "another rank's", path=str(path))
        raise RunInterrupted(
            f"stopped by {stop.name or 'a signal on another rank'} after step {self.state.step}; checkpoint saved "
            f"at {path}. Resume with: longcat train --config {self.loaded.config_path} "
            f"--set resume_from_checkpoint=latest", stop.signal or signal.SIGTERM)

    def finish(self) -> TrainResult:
        """The final checkpoint's LoRA copied to `output_dir/lora.safetensors`."""
        lora_path = self.output_dir / "lora.safetensors"
        final = self.output_dir / f"checkpoint-{self.state.step}"
        if not final.is_dir():  # e.g. resumed from a checkpoint in another directory at the last step
            self.checkpoint()  # every rank: it holds a barrier
        if self.accelerator.is_main_process:
            write_aside(lora_path, lambda temporary: shutil.copyfile(final / "lora.safetensors", temporary))
            self.log.event("done", step=self.state.step, lora=str(lora_path))
            ema = "none" if self.log.ema is None else f"{self.log.ema:.4f}"
            self.console.print(f"done: {self.state.step} steps, final loss EMA {ema}, "
                               f"{self.state.nan_skipped} non-finite steps skipped; LoRA at {lora_path}")
        if self.writer is not None:
            self.writer.close()
        return TrainResult(state=self.state, lora_path=lora_path, losses=self.log.losses)


def run_training(loaded: LoadedConfig, console: Console | None = None) -> TrainResult:
    """Train to the end; on SIGINT / SIGTERM stop after the running step with a checkpoint
    (`RunInterrupted`). One run per `output_dir`: a second one is refused, naming the first."""
    with contextlib.ExitStack() as scope:
        run = TrainingRun(loaded, console or Console(), scope)
        # from here on a signal costs work: before, caches are written atomically and nothing is lost
        stop = scope.enter_context(stop_on_signals())
        cfg, state = run.cfg, run.state
        if state.step >= run.total_steps:
            run.console.print(f"{cfg.output_dir} holds a finished run ({state.step} of {run.total_steps} steps): "
                              "nothing to train; raise max_train_steps to train on", soft_wrap=True)
            return run.finish()
        if cfg.validation_on_startup and state.step == 0:
            run.validate()
        plain = None if run.console.is_terminal else PlainProgress(run.console, run.total_steps)
        with progress_bar(run.console) as bar:
            task = bar.add_task("train", total=run.total_steps, completed=state.step, status="")
            while state.step < run.total_steps:
                if not run.step():
                    continue
                if plain is not None:
                    plain.update(state.step, run.log.losses[-1][1], run.log.ema, run.lr_scheduler.get_last_lr()[0],
                                 run.log.step_times)
                bar.update(task, completed=state.step, status=f"loss {run.log.ema:.4f} lr "
                           f"{run.lr_scheduler.get_last_lr()[0]:.2e} {run.log.step_times[-1]:.2f} s/step "
                           f"VRAM {peak_vram_gib():.1f} GiB")
                saved = state.step % cfg.checkpoint_step_interval == 0 or state.step == run.total_steps
                if saved:
                    run.checkpoint()
                if run.stop_agreed(stop):
                    run.stop(stop, saved)
                if cfg.validation_step_interval and (state.step % cfg.validation_step_interval == 0
                                                     or state.step == run.total_steps):
                    run.validate()
                run.log.restart_clock()
        return run.finish()
