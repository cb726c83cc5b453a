"""SimpleTuner's config files read as this trainer's: its keys and values, what each means here.

A SimpleTuner config (its LongCat-Video example, a guide's snippet, what its configurator writes
with `"--key"` names) is translated into our keys before validation: a key with the same meaning
under another name is renamed, a SimpleTuner value with the same meaning as one of ours replaced
(`num_train_epochs: 0` is "let max_train_steps decide", our null), the top-level dataset defaults
(`resolution`, `caption_dropout_probability`, ...) copied into each dataset that leaves them
unset, and a key that only drives SimpleTuner's own machinery (hub uploads, EMA off, RAM tricks)
dropped with one warning line. A value we cannot honour is an error with the alternative.
`SIMPLETUNER_TRAINING_KEYS` and `SIMPLETUNER_DATASET_KEYS` are that table; docs/config.md lists it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from longcat_train.config.problems import ProblemList

Treatment = Literal["same", "renamed", "dataset default", "no effect"]
CLI_PREFIX = "--"  # SimpleTuner's configurator writes argparse names: {"--learning_rate": "1e-4"}
# `{model_family}` or `{env:HOME}` in a value: SimpleTuner fills them from the config and the environment.
_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")


@dataclass(frozen=True)
class ValueReading:
    """A SimpleTuner value read as one of ours; `note` (when given) is said in a warning, as the
    two differ in a detail."""

    ours: Any
    note: str = ""


@dataclass(frozen=True)
class SimpleTunerKey:
    """What a SimpleTuner key does here (`note` is the docs' and the warning's words).

    `target`: our key for `renamed`, the dataset key for `dataset default`. `values`: SimpleTuner
    values (as text: the configurator writes `"0"` as often as `0`) with a reading of ours.
    `refuse(value)` returns the fix when the value cannot be honoured.
    `silent`: a `no effect` key whose accepted values say what this trainer does anyway (no warning).
    """

    treatment: Treatment
    note: str = ""
    target: str = ""
    values: Mapping[str, ValueReading] = field(default_factory=dict)
    refuse: Callable[[Any], str | None] | None = None
    silent: bool = False


def _refuse_unless(accepted: tuple[Any, ...], fix: str) -> Callable[[Any], str | None]:
    return lambda value: None if value in accepted else fix


def _refuse_true(fix: str) -> Callable[[Any], str | None]:
    return lambda value: fix if value is True or value == "true" else None


_SAME = SimpleTunerKey("same")
_SDPA = ValueReading("sdpa")
_FLASH = ValueReading("flash")
_UNTIL_THE_OTHER = ValueReading(None)  # SimpleTuner's 0: "the other length key decides"

SIMPLETUNER_TRAINING_KEYS: dict[str, SimpleTunerKey] = {
    **{key: _SAME for key in (
        "adam_beta1", "adam_beta2", "adam_epsilon", "adam_weight_decay", "aspect_bucket_alignment",
        "base_model_precision", "checkpoint_step_interval", "checkpoints_total_limit", "data_backend_config",
        "enable_group_offload", "eval_dataset_id", "flow_schedule_shift", "gradient_accumulation_steps",
        "gradient_checkpointing", "group_offload_blocks_per_group", "group_offload_type", "group_offload_use_stream",
        "learning_rate", "lora_alpha", "lora_dropout", "lora_rank", "lr_warmup_steps", "max_grad_norm",
        "mixed_precision", "model_family", "model_flavour", "model_type", "musubi_block_swap_device",
        "musubi_blocks_to_swap", "output_dir", "pretrained_model_name_or_path", "report_to",
        "resume_from_checkpoint", "seed", "tracker_project_name", "tracker_run_name", "train_batch_size",
        "vae_enable_slicing", "vae_enable_tiling", "validation_guidance", "validation_negative_prompt",
        "validation_num_inference_steps", "validation_num_video_frames", "validation_on_startup",
        "validation_prompt", "validation_seed", "validation_step_interval", "validation_using_datasets",
    )},
    "validation_resolution": SimpleTunerKey(
        "same", "SimpleTuner reads WIDTHxHEIGHT, this trainer HEIGHTxWIDTH: when the orientation contradicts the "
        "held-out clips (or the training buckets) a warning names both readings, and dataset renders follow the clips",
    ),
    "attention_mechanism": SimpleTunerKey(
        "renamed", "its kernels read as ours: `diffusers`, `cudnn`, `native-*` → `sdpa`; `flash-attn*` → `flash`; "
        "`flash-attn-3-hub` → `auto` (nothing is downloaded); others refused",
        target="attention_implementation",
        values={
            "diffusers": _SDPA, "cudnn": _SDPA, "native-efficient": _SDPA, "native-flash": _SDPA, "native-math": _SDPA,
            "flash-attn": _FLASH, "flash-attn-2": _FLASH, "flash-attn-3": _FLASH, "flash-attn-3-varlen": _FLASH,
            "flash-attn-3-hub": ValueReading(
                "auto", "kernels from the Hugging Face hub are never downloaded here; `auto` picks the fastest "
                "installed kernel per shape (cuDNN SDPA, block-sparse where the release uses it)"),
        },
    ),
    "optimizer": SimpleTunerKey(
        "same", "`adamw_bf16` → `adamw` (float32 LoRA weights and states); other optimizers refused",
        values={"adamw_bf16": ValueReading(
            "adamw", "trained with AdamW on float32 LoRA weights and optimizer states (adamw_bf16 keeps them in "
            "bf16 with stochastic rounding; a rank-16 LoRA's states are small either way)")},
    ),
    "lr_scheduler": SimpleTunerKey("same", "diffusers' schedules; SimpleTuner's own `sine` is refused"),
    "num_train_epochs": SimpleTunerKey("same", "`0` (SimpleTuner: max_train_steps decides) read as null",
                                       values={"0": _UNTIL_THE_OTHER}),
    "max_train_steps": SimpleTunerKey("same", "`0` (SimpleTuner: num_train_epochs decides) read as null",
                                      values={"0": _UNTIL_THE_OTHER}),
    "validation_steps": SimpleTunerKey("renamed", "SimpleTuner's older name", target="validation_step_interval"),
    "checkpointing_steps": SimpleTunerKey("renamed", "SimpleTuner's older name", target="checkpoint_step_interval"),
    "lora_init_type": SimpleTunerKey("renamed", "`default` and `gaussian`; PEFT's other inits refused", target="lora_init"),
    "optimizer_beta1": SimpleTunerKey("renamed", "", target="adam_beta1"),
    "optimizer_beta2": SimpleTunerKey("renamed", "", target="adam_beta2"),
    "user_prompt_library": SimpleTunerKey(
        "renamed", "its JSON prompt library, rendered at each validation and by `longcat validate`",
        target="validation_prompt_file",
    ),
    "lr_num_cycles": _SAME,
    "lr_power": _SAME,
    "lora_type": SimpleTunerKey(
        "no effect", "`standard` (PEFT LoRA) is what this trainer trains",
        refuse=_refuse_unless(("standard",), 'use "standard": this trainer trains PEFT LoRAs only (no LyCORIS)'),
        silent=True,
    ),
    "use_ema": SimpleTunerKey(
        "no effect", "no EMA copy of the LoRA is kept",
        refuse=_refuse_true("set use_ema to false: this trainer keeps no EMA weights"),
    ),
    "validation_prompt_library": SimpleTunerKey(
        "no effect", "SimpleTuner's built-in prompt library is not shipped",
        refuse=_refuse_true("set it to false and give your prompts in validation_prompt_file "
                            "(one prompt per line, or SimpleTuner's user_prompt_library JSON)"),
    ),
    **{key: SimpleTunerKey("dataset default", "SimpleTuner's default for datasets that leave it unset; "
                                              "copied into each such dataset", target=key)
       for key in ("resolution", "resolution_type", "caption_dropout_probability")},
    **{key: SimpleTunerKey("no effect", note) for key, note in (
        ("push_to_hub", "nothing is uploaded; the LoRA files are in output_dir"),
        ("push_checkpoints_to_hub", "nothing is uploaded"),
        ("push_to_hub_background", "nothing is uploaded"),
        ("hub_model_id", "nothing is uploaded"),
        ("modelspec_comment", "nothing is uploaded"),
        ("ramtorch", "SimpleTuner's RAM offload; use musubi_blocks_to_swap or let `longcat plan` choose"),
        ("ramtorch_target_modules", "SimpleTuner's RAM offload"),
        ("ramtorch_transformer_percent", "SimpleTuner's RAM offload"),
        ("ramtorch_text_encoder", "SimpleTuner's RAM offload"),
        ("ramtorch_vae", "SimpleTuner's RAM offload"),
        ("offload_during_startup", "encoders are loaded one at a time and freed before the DiT anyway"),
        ("compress_disk_cache", "caches are safetensors files"),
        ("disable_bucket_pruning", "buckets are never pruned; a batch no bucket can fill is refused before training"),
        ("vae_batch_size", "latents are encoded one clip at a time"),
        ("text_encoder_batch_size", "captions are encoded one at a time"),
        ("write_batch_size", "cache files are written one item at a time"),
        ("disable_benchmark", "no base-model render unless validation_on_startup"),
        ("validation_torch_compile", "renders run eagerly"),
        ("validation_guidance_rescale", "the official CFG-Zero* sampler has no rescale"),
        ("validation_disable_unconditional", "no unconditional render is made"),
        ("aspect_bucket_rounding", "bucket edges follow aspect_bucket_alignment"),
        ("minimum_image_size", "sources too small are skipped by max_upscale per dataset"),
        ("lycoris_config", "no LyCORIS"),
        ("ema_decay", "no EMA"),
        ("ema_device", "no EMA"),
        ("ema_cpu_only", "no EMA"),
        ("ema_update_interval", "no EMA"),
        ("webhook_config", "no webhooks"),
        ("logging_dir", "TensorBoard logs go to output_dir/logs"),
        ("fuse_qkv_projections", "the released blocks have fused q|k|v already"),
    )},
}

SIMPLETUNER_DATASET_KEYS: dict[str, SimpleTunerKey] = {
    **{key: _SAME for key in (
        "id", "dataset_type", "disabled", "instance_data_dir", "conditioning_data",
        "instance_prompt", "caption_dropout_probability", "resolution", "resolution_type", "crop", "crop_style",
        "crop_aspect", "cache_dir_vae", "repeats", "probability", "is_i2v", "video", "default", "cache_dir",
    )},
    "type": SimpleTunerKey(
        "same", "`local` only; `huggingface`, `aws` and other remote backends refused",
        refuse=_refuse_unless(("local",), 'download the dataset first (e.g. `hf download NAME --repo-type dataset '
                                          '--local-dir DIR`), then set "type": "local" and "instance_data_dir": DIR'),
    ),
    "caption_strategy": SimpleTunerKey(
        "same", "`textfile`, `filename`, `instanceprompt`, null; `huggingface` and `parquet` refused",
        refuse=lambda value: "put a .txt caption beside each clip (same stem) and use \"textfile\""
        if value in ("huggingface", "parquet") else None,
    ),
    "disable": SimpleTunerKey("renamed", "SimpleTuner's other spelling", target="disabled"),
    **{key: SimpleTunerKey("no effect", note) for key, note in (
        ("dataset_name", "read by huggingface datasets only"),
        ("huggingface", "read by huggingface datasets only"),
        ("metadata_backend", "metadata is read from the files"),
        ("minimum_image_size", "each source is resized to its bucket; max_upscale skips those far too small"),
        ("maximum_image_size", "each source is resized straight to its bucket"),
        ("target_downsample_size", "each source is resized straight to its bucket"),
        ("minimum_aspect_ratio", "every aspect gets a bucket"),
        ("maximum_aspect_ratio", "every aspect gets a bucket"),
        ("max_upscale_threshold", "see max_upscale"),
        ("write_batch_size", "cache files are written one item at a time"),
        ("text_encoder_batch_size", "captions are encoded one at a time"),
        ("metadata_update_interval", "no metadata cache"),
        ("skip_file_discovery", "the directory is scanned each run (cached latents are reused)"),
        ("preserve_data_backend_cache", "the directory is scanned each run (cached latents are reused)"),
        ("hash_filenames", "cache files are named by content hashes anyway"),
        ("vae_cache_clear_each_epoch", "latents are cached once and reused"),
        ("disable_multiline_split", "a caption file is one caption"),
    )},
}

# SimpleTuner's defaults that differ from ours, for the keys a guide-style config usually leaves
# unset: (dataset key, SimpleTuner's default, what the difference means).
SIMPLETUNER_DATASET_DEFAULTS: dict[str, tuple[Any, str]] = {
    "resolution_type": ("pixel_area", "with resolution 480 a landscape clip trains 832 wide × 480 high here (short "
                                      "edge 480), 640 wide × 384 high with SimpleTuner's pixel_area (1.73x fewer pixels)"),
    "crop": (False, "here clips are cropped to their bucket's aspect; SimpleTuner squashes them"),
    "caption_dropout_probability": (0.1, "here 5 % of samples train on the empty prompt; SimpleTuner drops 10 %"),
    "resolution": (1024, "SimpleTuner's global default is 1024; here 480, the model's native short edge"),
}


def strip_cli_prefixes(raw: dict[str, Any], file: Path | str, problems: ProblemList) -> dict[str, Any]:
    """`raw` with the configurator's `"--key"` names as `"key"`; a key given both ways is an error."""
    table: dict[str, Any] = {}
    written: dict[str, str] = {}
    for key, value in raw.items():
        name = key[len(CLI_PREFIX):] if key.startswith(CLI_PREFIX) else key
        if name in written:
            problems.add(file, key, value, f'"{name}" is given twice, as "{written[name]}" and "{key}"',
                         "keep one of them")
            continue
        written[name] = key
        table[name] = value
    return table


def fill_placeholders(value: Any, variables: Mapping[str, Any]) -> Any:
    """`{name}` (a config key's value) and `{env:NAME}` in strings, nested too, as SimpleTuner fills
    them; an unknown name is left as written."""
    if isinstance(value, dict):
        return {key: fill_placeholders(item, variables) for key, item in value.items()}
    if isinstance(value, list):
        return [fill_placeholders(item, variables) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name.startswith("env:"):
            return os.environ.get(name[4:], "")
        known = variables.get(name)
        return str(known) if isinstance(known, str | int | float) and not isinstance(known, bool) else match.group(0)

    return _PLACEHOLDER.sub(replace, value)


@dataclass
class Translation:
    """A table in our keys and values, the dataset defaults it set (SimpleTuner's top-level
    `resolution` & co.), and the name each renamed key was written as (so problems name it)."""

    table: dict[str, Any] = field(default_factory=dict)
    dataset_defaults: dict[str, Any] = field(default_factory=dict)
    written_as: dict[str, str] = field(default_factory=dict)

    def name_as_written(self, problems: ProblemList, since: int, prefix: str = "") -> None:
        """Problems added after position `since` name a renamed key as the user wrote it."""
        for index in range(since, len(problems.problems)):
            problem = problems.problems[index]
            for ours, theirs in self.written_as.items():
                ours, theirs = (f"{prefix}.{ours}", f"{prefix}.{theirs}") if prefix else (ours, theirs)
                if problem.key == ours or problem.key.startswith((f"{ours}.", f"{ours}[")):
                    problems.problems[index] = replace(problem, key=theirs + problem.key[len(ours):])


def names_of_one_setting(key: str, table: Mapping[str, SimpleTunerKey]) -> tuple[str, set[str]]:
    """`key`'s own name here and every name `table` reads as that setting (e.g. `validation_steps`
    for `validation_step_interval`), so an override can replace the setting whatever the file calls it."""
    entry = table.get(key)
    ours = entry.target if entry is not None and entry.treatment == "renamed" and entry.target else key
    names = {ours} | {name for name, e in table.items() if e.treatment == "renamed" and e.target == ours}
    return ours, names


def translate(
    raw: dict[str, Any], table: Mapping[str, SimpleTunerKey], file: Path | str, prefix: str, problems: ProblemList
) -> Translation:
    """`raw` read through `table`: warnings for keys without effect and for values read with a
    difference; errors for values that cannot be honoured. Keys not in `table` pass unchanged
    (ours, or unknown: validation reports those)."""
    result = Translation()
    for key, value in raw.items():
        entry = table.get(key)
        if entry is None:
            result.table[key] = value
            continue
        where = f"{prefix}.{key}" if prefix else key
        fix = entry.refuse(value) if entry.refuse is not None else None
        if fix is not None:
            problems.add(file, where, value, "a SimpleTuner value this trainer cannot honour", fix)
            continue
        if entry.treatment == "no effect":
            if not entry.silent:
                problems.add(file, where, value, f"SimpleTuner setting with no effect here: {entry.note}",
                             "nothing to do; remove the key to silence this line", severity="warning")
            continue
        reading = entry.values.get(str(value)) if isinstance(value, str | int) and not isinstance(value, bool) else None
        if reading is not None:
            if reading.note:
                problems.add(file, where, value, f"read as {reading.ours!r}: {reading.note}",
                             f"write {reading.ours!r} to silence this line", severity="warning")
            value = reading.ours
        if entry.treatment == "dataset default":
            result.dataset_defaults[entry.target] = value
        elif entry.target and entry.target in raw:
            problems.add(file, where, value, f'the same setting as "{entry.target}", which is given too',
                         f'keep one of "{key}" and "{entry.target}"')
        else:
            result.table[entry.target or key] = value
            if entry.target:
                result.written_as[entry.target] = key
    return result


def defaults_left_unset(datasets: list[Any]) -> dict[str, list[str]]:
    """Per key of `SIMPLETUNER_DATASET_DEFAULTS`, the ids of the datasets (DatasetConfig) that
    leave it unset, so they get our default where SimpleTuner's differs."""
    unset = {key: [d.id for d in datasets if key not in d.model_fields_set] for key in SIMPLETUNER_DATASET_DEFAULTS}
    return {key: ids for key, ids in unset.items() if ids}
