"""The training config (`config.json`): the keys the LongCat-Video guides document, same names."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictInt

from longcat_train.release_facts import BLOCK_LINEARS, PROJECTION_MODULES
from longcat_train.config.extension_tables import PACKAGE, Choice, extension_choices
from longcat_train.config.rules import (
    Flag,
    check_alignment,
    check_frames,
    check_path_text,
    check_resolution_text,
    parse_resolution,
)

ModelFlavour = Literal["final"]
BasePrecision = Literal["bf16", "no_change", "int8-quanto", "int4-quanto", "fp8-torchao"]


# The names the config accepts, with their words, read as text from the code's tables (see
# `extension_tables`): a new LoRA format or attention backend is its row there alone.
LORA_FORMAT_CHOICES = extension_choices(PACKAGE / "lora" / "formats.py", "LORA_FORMATS")
ATTENTION_CHOICES = extension_choices(PACKAGE / "model" / "attention.py", "ATTENTION_BACKENDS")


def described_choices(choices: dict[str, Choice]) -> str:
    """"`a` (note), `b`": the names of an extension table for a key's description."""
    return ", ".join(f"`{name}`" + (f" ({c.note})" if c.note else "") for name, c in choices.items())


# Literal[tuple] is Literal[*names]: pydantic checks and `config.md` lists the tables' names.
AttentionImplementation = Literal[tuple(ATTENTION_CHOICES)]  # type: ignore[valid-type]
LoraFormat = Literal[tuple(LORA_FORMAT_CHOICES)]  # type: ignore[valid-type]
KeptProjection = Literal[tuple(PROJECTION_MODULES)]  # type: ignore[valid-type]

# Every linear layer of a block that carries most of the compute; the patch embedder, caption
# MLP, timestep MLP and final layer are left frozen on purpose.
DEFAULT_LORA_TARGETS: tuple[str, ...] = (
    "attn.qkv",
    "attn.proj",
    "cross_attn.q_linear",
    "cross_attn.kv_linear",
    "cross_attn.proj",
    "ffn.w1",
    "ffn.w2",
    "ffn.w3",
)
NUM_BLOCKS = 48

# Rules whose failures must carry a fix ride on the types (see `rules.py`).
Frames = Annotated[int, AfterValidator(check_frames)]
Resolution = Annotated[str, AfterValidator(check_resolution_text)]
Alignment = Annotated[int, AfterValidator(check_alignment)]


class TrainingConfig(BaseModel):
    """Settings of one training run (`config.json`)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True, allow_inf_nan=False)

    # --- model -------------------------------------------------------------------------------
    model_family: Literal["longcat_video"] = Field(
        "longcat_video", description="Model family; this trainer trains LongCat-Video only."
    )
    model_flavour: ModelFlavour = Field(
        "final",
        description="Checkpoint flavour; `final` is the released text/image-to-video checkpoint. "
        "Selects the default checkpoint path when `pretrained_model_name_or_path` is null.",
    )
    model_type: Literal["lora"] = Field("lora", description="What is trained: a LoRA on the frozen DiT.")
    pretrained_model_name_or_path: Annotated[Path | None, BeforeValidator(check_path_text)] = Field(
        None,
        description="Local checkpoint directory in the official layout (dit/, vae/, text_encoder/, "
        "tokenizer/, scheduler/). null: `$LONGCAT_HOME/models/LongCat-Video` "
        "(LONGCAT_HOME defaults to ~/.cache/longcat). Nothing is downloaded.",
    )
    base_model_precision: BasePrecision = Field(
        "bf16",
        description="Storage of the frozen DiT weights: `bf16` (`no_change` keeps bf16 too), "
        "`int8-quanto`/`int4-quanto` (optimum-quanto), `fp8-torchao` (torchao).",
    )
    mixed_precision: Literal["bf16", "no"] = Field(
        "bf16", description="Compute precision under Accelerate: `bf16`, or `no` for float32 (CPU tests)."
    )
    attention_implementation: AttentionImplementation = Field(
        "auto",
        description=f"Self-attention kernel: {described_choices(ATTENTION_CHOICES)}. "
        "SimpleTuner's `attention_mechanism` is read as this key (see the SimpleTuner table).",
    )
    flow_schedule_shift: float | None = Field(
        None, gt=0, description="Flow-matching σ shift; null uses the checkpoint scheduler's (12.0)."
    )
    flow_sigma_sampling: Literal["logit_normal", "uniform"] = Field(
        "logit_normal", description="Distribution σ is drawn from per sample, before the shift."
    )

    # --- paths -------------------------------------------------------------------------------
    output_dir: Annotated[Path, BeforeValidator(check_path_text)] = Field(
        Path("output"),
        description="Where checkpoints, LoRA files, logs and validation renders go. Relative paths "
        "are relative to the config file.",
    )
    data_backend_config: Annotated[Path, BeforeValidator(check_path_text)] = Field(
        Path("multidatabackend.json"),
        description="The dataset list (`multidatabackend.json`); relative to the config file "
        "(the current directory is tried when nothing is there).",
    )

    # --- LoRA ----------------------------------------------------------------------------------
    lora_rank: StrictInt = Field(8, gt=0, le=4096, description="LoRA rank (a whole number; `true` is not one).")
    lora_alpha: float | None = Field(None, description="LoRA alpha; null means equal to `lora_rank` (scale 1).")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA branch.")
    lora_init: Literal["default", "gaussian"] = Field(
        "default", description="PEFT initialisation of the down-projection (up-projection starts at zero)."
    )
    lora_target_modules: list[str] = Field(
        list(DEFAULT_LORA_TARGETS),
        min_length=1,
        description="The linears of each block that get a LoRA, by their path in the block: "
        + ", ".join(f"`{name}`" for name in BLOCK_LINEARS) + ".",
    )
    lora_export_formats: list[LoraFormat] = Field(
        ["comfyui"],
        min_length=1,
        description=f"LoRA files written at each checkpoint: {described_choices(LORA_FORMAT_CHOICES)}.",
    )

    # --- optimisation -------------------------------------------------------------------------
    train_batch_size: int = Field(1, ge=1, le=4096, description="Clips per step per GPU (one bucket per batch).")
    gradient_accumulation_steps: int = Field(1, ge=1, le=4096, description="Micro-batches per optimizer step.")
    gradient_checkpointing: Flag = Field(True, description="Recompute block activations in backward.")
    gradient_checkpointing_mode: Literal["full", "selective"] = Field(
        "selective",
        description="`selective` keeps each block's self-attention output instead of recomputing it "
        "(faster; 0.29 GiB per block at 480x832x93, in host memory with `activation_offload`); "
        "`full` recomputes everything.",
    )
    selective_checkpointing_blocks: int | None = Field(
        None, ge=0, description="With `selective`: keep attention outputs of only the first N blocks (null: all)."
    )
    keep_projections: list[KeptProjection] = Field(
        [],
        description="With `selective`: projection outputs kept as well, each skipping its GEMM in the "
        "recomputation (`qkv` 0.86 GiB per block at 480x832x93, `attention_out`, `cross_q`, `cross_out` "
        "0.29, `ffn_w1`, `ffn_w3` 0.77; in host memory with `activation_offload`). Acts on bf16 weights "
        "whose linear carries a LoRA; `longcat plan` recommends a set that fits.",
    )
    activation_offload: Flag = Field(
        True,
        description="On CUDA, keep checkpointed block inputs and kept attention outputs in pinned host "
        "memory, fetched back asynchronously a block ahead of backward (26 GiB less GPU memory at "
        "480x832x93 with `selective`, as much host RAM more; no measurable time).",
    )
    learning_rate: float = Field(1e-4, gt=0.0, le=1.0, description="Peak learning rate.")
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial"] = Field(
        "constant",
        description="Learning-rate schedule after warmup (diffusers' `get_scheduler`; `constant` holds the peak "
        "from step 0, `constant_with_warmup` after the warmup).",
    )
    lr_num_cycles: int = Field(1, ge=1, le=10_000, description="Hard restarts of `cosine_with_restarts`.")
    lr_power: float = Field(1.0, gt=0.0, le=100.0, description="Power of the `polynomial` decay (1: linear).")
    lr_warmup_steps: int = Field(0, ge=0, le=10**9, description="Linear warmup steps.")
    optimizer: Literal["adamw"] = Field("adamw", description="Optimizer (AdamW, fused where available).")
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW β1.")
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0, description="AdamW β2.")
    adam_weight_decay: float = Field(0.01, ge=0.0, description="AdamW decoupled weight decay.")
    adam_epsilon: float = Field(1e-8, gt=0.0, description="AdamW ε.")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping norm; 0 disables clipping.")
    max_train_steps: int | None = Field(
        None, ge=1, le=10**9, description="Optimizer steps to train; when set it wins over `num_train_epochs`."
    )
    num_train_epochs: int | None = Field(1, ge=1, le=10**6, description="Epochs to train when `max_train_steps` is null.")
    seed: int = Field(42, ge=0, lt=2**63, description="Seed for every random choice (data order, noise, σ, dropout).")

    # --- validation ---------------------------------------------------------------------------
    validation_prompt: str | None = Field(None, description="Prompt rendered at each validation.")
    validation_prompt_file: Path | None = Field(
        None,
        description="Prompts rendered at each validation and by `longcat validate`, after `validation_prompt`: "
        "a text file with one prompt per line (`# ` starts a comment line; ` --i PATH` at the end of a line "
        "gives that prompt a start image, rendered image-to-video), or a `.json` prompt library as "
        "SimpleTuner's `user_prompt_library` writes it (`{\"name\": \"prompt\"}`). Relative to the config file.",
    )
    validation_continuation_video: Annotated[Path | None, BeforeValidator(check_path_text)] = Field(
        None,
        description="A clip to continue at each validation (video continuation, as the official `generate_vc`): "
        "its last `validation_continuation_cond_frames` frames at 15 fps, fitted to `validation_resolution` turned to the "
        "clip's orientation, condition a render of `validation_num_video_frames` frames with `validation_prompt`; "
        "the render shows those frames, then the new ones. Relative to the config file.",
    )
    validation_continuation_cond_frames: Frames = Field(
        13,
        description="Frames of `validation_continuation_video` (and of `longcat validate --video`) that condition the "
        "continuation, fewer than `validation_num_video_frames`; 13 (4 latent frames) as the official demo.",
    )
    validation_negative_prompt: str | None = Field(
        None, description="Negative prompt for CFG; null uses the empty prompt, as the official sampler."
    )
    validation_resolution: Resolution = Field(
        "480x832", description='Render size as "HEIGHTxWIDTH" (the guides\' "480x832" is 480 high, 832 wide).'
    )
    validation_num_video_frames: Frames = Field(93, description="Frames per render; (frames - 1) % 4 == 0.")
    validation_num_inference_steps: int = Field(40, ge=1, le=1000, description="Denoising steps per render.")
    validation_guidance: float = Field(4.0, ge=1.0, description="CFG scale; 1.0 turns CFG off.")
    validation_seed: int | None = Field(None, description="Seed of validation noise; null uses `seed`.")
    validation_step_cache: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Step caching for renders (opt-in, approximate): a sampler step whose first block's output "
        "changed by less than this fraction (relative mean absolute change) since the last fully computed "
        "step skips the other blocks and reuses their residual. 0 (default): exact; about 0.05 is a start "
        "(docs/benchmarks.md has speed and quality figures).",
    )
    validation_using_datasets: Flag = Field(
        False,
        description="Validate on the start frames and captions of `eval_dataset_id` instead of "
        "`validation_prompt` alone.",
    )
    eval_dataset_id: str | None = Field(
        None,
        description="Dataset id of the held-out validation split (not trained on); used for "
        "dataset-driven renders and the held-out loss.",
    )
    validation_step_interval: int | None = Field(
        100,
        ge=1,
        description="Validate every N steps and after the last step (SimpleTuner's `validation_steps` is "
        "read as this key); null: never during training (render afterwards with `longcat validate`).",
    )
    validation_on_startup: Flag = Field(
        False, description="Render once before the first step, as a base-model reference."
    )

    # --- checkpoints --------------------------------------------------------------------------
    checkpoint_step_interval: int = Field(
        500,
        ge=1,
        description="Save a resumable checkpoint every N steps (and at the end). "
        "SimpleTuner's `checkpointing_steps` is read as this key.",
    )
    checkpoints_total_limit: int | None = Field(
        3, ge=1, description="Keep at most this many checkpoints (oldest pruned); null keeps all."
    )
    resume_from_checkpoint: str | None = Field(
        None, description='`"latest"` (newest in output_dir, if any) or a checkpoint directory.'
    )

    # --- data ---------------------------------------------------------------------------------
    aspect_bucket_alignment: Alignment = Field(
        64,
        description="Bucket edges are multiples of this (16, 32 or 64). 480x832 needs 32 or 16: "
        "480 is not a multiple of 64.",
    )
    vae_enable_tiling: Flag = Field(False, description="Encode/decode with the VAE in tiles (less memory).")
    vae_enable_slicing: Flag = Field(False, description="Encode/decode one sample of a batch at a time.")

    # --- memory -------------------------------------------------------------------------------
    musubi_blocks_to_swap: int = Field(
        0, ge=0, le=NUM_BLOCKS - 1, description="Frozen weights of this many of the 48 blocks live in host memory and stream in."
    )
    musubi_block_swap_device: Literal["cpu"] = Field(
        "cpu", description="Where swapped blocks wait between uses: host RAM, the only place that frees GPU memory."
    )
    enable_group_offload: Flag = Field(False, description="Offload groups of modules (diffusers hooks).")
    group_offload_type: Literal["block_level", "leaf_level"] = Field(
        "block_level", description="Granularity of group offload."
    )
    group_offload_blocks_per_group: int = Field(1, ge=1, description="Blocks per offload group (block_level).")
    group_offload_use_stream: Flag = Field(False, description="Overlap offload transfers on a CUDA stream.")

    # --- several GPUs -------------------------------------------------------------------------
    distributed_strategy: Literal["ddp", "fsdp", "ulysses"] = Field(
        "ddp",
        description="With several processes: `ddp` keeps the whole frozen DiT on every GPU; `fsdp` shards "
        "its weights over the GPUs block by block (PyTorch FSDP2), so N GPUs hold 1/N of the 27 GB of "
        "bf16 weights each plus the blocks in flight; the LoRA and its optimizer state stay whole on "
        "every GPU. Same samples and the same LoRA either way; `fsdp` gathers each block's weights in "
        "forward and again in backward. `ulysses` trains one sample at a time on all GPUs together, "
        "each holding 1/N of its tokens (and activations), with all-to-alls over the attention heads "
        "(sequence parallelism, for long clips); the process count must divide the 32 heads and "
        "each bucket's token rows or columns (height / 16, width / 16). One process: no effect.",
    )

    # --- logging ------------------------------------------------------------------------------
    report_to: Literal["tensorboard", "wandb", "all", "none"] = Field(
        "tensorboard", description="Experiment trackers; wandb only when installed."
    )
    tracker_project_name: str = Field("longcat-train", description="Project name in the trackers.")
    tracker_run_name: str | None = Field(None, description="Run name; null derives one from the time.")

    @property
    def validation_size(self) -> tuple[int, int]:
        """`validation_resolution` as (height, width)."""
        return parse_resolution(self.validation_resolution)

    @property
    def effective_lora_alpha(self) -> float:
        return float(self.lora_rank if self.lora_alpha is None else self.lora_alpha)
