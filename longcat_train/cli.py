"""The `longcat` command line: a thin shell; each command loads the config and calls one function.

Exit codes: 0 done, 1 a run stopped on purpose (non-finite losses, out of memory, no GPU for a
benchmark) or `data check` found a training dataset without a usable clip, 2 config or argument
problems (no traceback). Heavy modules are imported inside the commands so `--help` and
`config check` answer at once.

Output to a pipe or file is printed at a width nothing reaches, so paths, ids and commands are never
cut or wrapped; `--json` (`config check`, `data check`, `plan`) prints one JSON document instead.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic_core import PydanticCustomError
from rich.console import Console
from rich.markup import escape

from longcat_train.config import ConfigError, ConfigProblem, LoadedConfig, load_config

# Set before anything initialises CUDA; a key the user's own PYTORCH_CUDA_ALLOC_CONF names wins.
ALLOCATOR_DEFAULTS = {
    # growable segments instead of fixed blocks, so a long run's allocation pattern (per-bucket
    # activation sizes, swapped blocks) does not strand reserved memory (a 24 GiB-capped step ran
    # out with 1.29 GiB reserved but unused)
    "expandable_segments": "True",
    # pinned host memory (offloaded activations, swapped blocks: up to ~100 GiB) as malloc'd pages
    # touched by 8 threads then registered, 8.5 GiB/s against cudaHostAlloc's 2.0 on an H200 host
    # (docs/benchmarks.md): 12 s instead of 50 before the first step
    "pinned_use_cuda_host_register": "True",
    "pinned_num_register_threads": "8",
}


def allocator_settings(current: str) -> str:
    """`current` (a PYTORCH_CUDA_ALLOC_CONF value) with each of `ALLOCATOR_DEFAULTS` it lacks added."""
    named = {item.split(":", 1)[0].strip() for item in current.split(",") if item.strip()}
    added = [f"{key}:{value}" for key, value in ALLOCATOR_DEFAULTS.items() if key not in named]
    return ",".join([item for item in current.split(",") if item.strip()] + added)


os.environ["PYTORCH_CUDA_ALLOC_CONF"] = allocator_settings(os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""))
from longcat_train.config.examples import ExistingFilesError, write_example_configs
from longcat_train.config.model_paths import missing_distill_lora, missing_refinement_lora
from longcat_train.config.problems import problems_document, warnings_table
from longcat_train.config.rules import check_frames, parse_resolution
from longcat_train.config.summary import config_summary, differing_defaults
from longcat_train.config.training import LORA_FORMAT_CHOICES

EXIT_CONFIG_ERROR = 2
EXIT_STOPPED = 1

app = typer.Typer(
    name="longcat",
    help="LoRA fine-tuning for Meituan's LongCat-Video (13.6B text/image-to-video DiT).",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Check config files, or write examples to start from.", no_args_is_help=True)
data_app = typer.Typer(help="Inspect datasets without a GPU or a model.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")

# The width of output to a pipe or file: no line of ours reaches it, so nothing is cut or wrapped.
PIPED_WIDTH = 10_000


def _console(stderr: bool = False) -> Console:
    # Made per call so the terminal width (COLUMNS) is read when the command runs. A pipe or file
    # is told by isatty, not rich's is_terminal, which FORCE_COLOR (set for coloured CI logs) turns on.
    console = Console(stderr=stderr)
    return console if console.file.isatty() else Console(stderr=stderr, width=PIPED_WIDTH)


def _out() -> Console:
    return _console()


def _err() -> Console:
    return _console(stderr=True)


def _print_json(document: dict) -> None:
    typer.echo(json.dumps(document, indent=2, ensure_ascii=False))


def _flag(*names: str, help: str) -> typer.models.OptionInfo:
    """A boolean option given without a value (`--t2v`, not `--t2v true`); an empty metavar, as
    typer's help would otherwise print `<bool>` after it, which reads as if it took one."""
    return typer.Option(*names, metavar="", help=help)


ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="config.json (its data_backend_config names the datasets file).")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="Override a config key, e.g. [bold]--set learning_rate=2e-4[/] or "
        "[bold]--set datasets\\[clips].video.num_frames=33[/] (repeatable; VALUE is JSON when it parses).",
    ),
]


JsonOption = Annotated[bool, _flag("--json", help="Print one JSON document on stdout instead of tables "
                                                   "(config problems too; the exit code is the same).")]


def _fail(error: ConfigError, as_json: bool = False) -> NoReturn:
    if as_json:
        _print_json(problems_document(error.problems))
    else:
        _err().print(error)
    raise typer.Exit(EXIT_CONFIG_ERROR)


def _load(config: Path, overrides: list[str] | None, as_json: bool = False, **checks: bool) -> LoadedConfig:
    """The checked config, or the problems (a table on stderr, or `--json` on stdout) and exit code 2.
    Warnings go in the table, or are left for the command's JSON document."""
    try:
        loaded = load_config(config, tuple(overrides or ()), **checks)
    except ConfigError as error:
        _fail(error, as_json)
    if loaded.warnings and not as_json:
        _err().print(warnings_table(loaded.warnings))
    return loaded


def _argument_problem(option: str, value: object, rule: str, fix: str) -> ConfigProblem:
    return ConfigProblem("command line", option, value, rule, fix)


@app.command()
def train(config: ConfigOption, set_: SetOption = None) -> None:
    """Train a LoRA: cache latents and text embeddings, then train, checkpoint and validate."""
    loaded = _load(config, set_)
    _run_training(loaded)


def _run_training(loaded: LoadedConfig):
    from longcat_train.training.interrupts import RunInterrupted
    from longcat_train.training.loop import TrainingStopped, run_training

    try:
        return run_training(loaded, _out())
    except TrainingStopped as stopped:
        _err().print(f"[bold red]training stopped:[/] {escape(str(stopped))}", soft_wrap=True)
        raise typer.Exit(EXIT_STOPPED) from None
    except RunInterrupted as interrupted:
        _err().print(f"[bold yellow]training interrupted:[/] {escape(str(interrupted))}", soft_wrap=True)
        raise typer.Exit(interrupted.exit_code) from None


def _strength(text: str) -> float | None:
    """The LoRA strength `text` gives, or None when it is not a finite number."""
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _read_lora(option: str, path: Path) -> tuple[Any, list[ConfigProblem]]:
    """The LoRA file at `path`, or the problem that it cannot be read (not safetensors, not a LoRA),
    found before any model is loaded."""
    from longcat_train.lora import read_lora

    try:
        return read_lora(path), []
    except Exception as error:  # unreadable or foreign file: say which and why, no traceback
        return None, [_argument_problem(option, str(path), f"not a readable LoRA file ({error})",
                                        f"give a .safetensors LoRA in {_listed(_FORMAT_TITLES, 'or')} format")]


def _lora_specs(values: list[str]) -> tuple[list[tuple[Path, float]], list[ConfigProblem]]:
    """`PATH[:STRENGTH]` -> (path, strength); strength defaults to 1.0."""
    specs: list[tuple[Path, float]] = []
    problems: list[ConfigProblem] = []
    for value in values:
        path_text, colon, strength_text = value.rpartition(":")
        path, strength = Path(value), 1.0
        if colon and not path.is_file():  # PATH:STRENGTH, unless the ':' is in an existing file's name
            given = _strength(strength_text)
            if given is not None or Path(path_text).is_file():
                path, strength = Path(path_text), 1.0 if given is None else given
            if given is None and path.is_file():
                problems.append(_argument_problem(
                    "--lora", value, f"bad strength {strength_text!r}: not a finite number",
                    f"give PATH:STRENGTH with a number, e.g. {path_text}:0.8"
                ))
        if not path.is_file():
            problems.append(_argument_problem(
                "--lora", value, "LoRA file does not exist", "give an existing .safetensors file, optionally PATH:STRENGTH"
            ))
        else:
            problems.extend(_read_lora("--lora", path)[1])
        specs.append((path, strength))
    return specs, problems


@app.command()
def validate(
    config: ConfigOption,
    lora: Annotated[list[str] | None, typer.Option(metavar="PATH[:STRENGTH]", help="LoRA to apply (repeatable).")] = None,
    image: Annotated[Path | None, typer.Option(help="Start image: renders image-to-video.")] = None,
    video: Annotated[Path | None, typer.Option(
        help="A clip to continue (video continuation, as the official generate_vc): its last --cond-frames frames "
             "at 15 fps condition the render, which shows them and then the new frames.")] = None,
    cond_frames: Annotated[int | None, typer.Option(
        help="Frames of --video that condition the render, 1 + 4k (default: validation_continuation_cond_frames, 13 as "
             "the official demo).")] = None,
    prompt: Annotated[str | None, typer.Option(help="Prompt (default: validation_prompt).")] = None,
    prompt_file: Annotated[Path | None, typer.Option(
        help="Render each prompt of this file instead (one per line, ` --i PATH` after a prompt for its start "
             "image; or a SimpleTuner prompt library .json).")] = None,
    resolution: Annotated[str | None, typer.Option(metavar="HxW", help="Render size, e.g. 480x832.")] = None,
    frames: Annotated[int | None, typer.Option(help="Frames; (frames - 1) % 4 == 0.")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps.")] = None,
    guidance: Annotated[float | None, typer.Option(help="CFG scale (1 disables CFG).")] = None,
    seed: Annotated[int | None, typer.Option(help="Noise seed.")] = None,
    distilled: Annotated[bool, _flag("--distilled", help="16 steps without CFG with the checkpoint's "
                                                        "lora/cfg_step_lora.safetensors (the official distilled mode).")] = False,
    refine: Annotated[bool, _flag("--refine", help="Then refine each render as the official refinement stage: "
                                                  "720p, 30 fps, with the checkpoint's lora/refinement_lora.safetensors "
                                                  "and block-sparse attention; written beside it as <name>_refined.mp4 "
                                                  "(the official demos refine a --distilled render).")] = False,
    spatial_only: Annotated[bool, _flag("--spatial-only", help="With --refine: 720p only, at 15 fps (no 2x frames).")] = False,
    fp8: Annotated[bool, _flag("--fp8", help="FP8 matmuls in the DiT's blocks (Ada/Hopper GPUs): less VRAM, approximate.")] = False,
    step_cache: Annotated[float | None, typer.Option(
        metavar="FRACTION", help="Skip the later blocks at steps whose first block changed less than this "
                                 "(e.g. 0.05): faster, approximate (default: validation_step_cache).")] = None,
    set_: SetOption = None,
) -> None:
    """Render videos (one-off, no training) with the validation settings and optional LoRAs."""
    # The render options are the validation_* keys, so they pass through the same checks; a problem
    # with a given option's key names the option.
    options = {
        "validation_prompt": ("--prompt", prompt),
        "validation_resolution": ("--resolution", resolution),
        "validation_num_video_frames": ("--frames", frames),
        "validation_num_inference_steps": ("--steps", steps),
        "validation_guidance": ("--guidance", guidance),
        "validation_seed": ("--seed", seed),
        "validation_step_cache": ("--step-cache", step_cache),
        "validation_continuation_video": ("--video", None if video is None else str(video)),
        "validation_continuation_cond_frames": ("--cond-frames", cond_frames),
    }
    if prompt_file is not None:  # its prompts only: no dataset renders, no validation_prompt
        options["validation_prompt_file"] = ("--prompt-file", str(prompt_file.resolve()))
        options["validation_using_datasets"] = ("--prompt-file", False)
    given = {key: (option, value) for key, (option, value) in options.items() if value is not None}
    overrides = [*(set_ or []), *(f"{key}={json.dumps(value)}" for key, (_, value) in given.items())]
    if prompt_file is not None and prompt is None:
        overrides.append("validation_prompt=null")
    loras, problems = _lora_specs(lora or [])
    if image is not None and not image.is_file():
        problems.append(_argument_problem("--image", str(image), "image file does not exist", "give an existing PNG/JPEG"))
    if image is not None and video is not None:
        problems.append(_argument_problem("--video", str(video), "--image and --video both condition the render",
                                          "give --image (image-to-video) or --video (continuation)"))
    try:
        loaded = load_config(config, tuple(overrides))
    except ConfigError as error:
        _fail(ConfigError([
            *(dataclasses.replace(p, file="command line", key=given[p.key][0]) if p.key in given else p
              for p in error.problems),
            *problems,
        ]))
    if cond_frames is not None and video is None and loaded.training.validation_continuation_video is None:
        problems.append(_argument_problem("--cond-frames", cond_frames, "there is no clip to continue",
                                          "add --video CLIP, or set validation_continuation_video"))
    for option, wanted, missing_lora in (("--distilled", distilled, missing_distill_lora),
                                         ("--refine", refine, missing_refinement_lora)):
        missing = missing_lora(loaded.model_dir) if wanted else None
        if missing is not None:
            problems.append(_argument_problem(option, *missing))
    if spatial_only and not refine:
        problems.append(_argument_problem("--spatial-only", True, "it only changes a refined render",
                                          "add --refine, or leave --spatial-only out"))
    if problems:
        _fail(ConfigError(problems))
    from longcat_train.validation.command import run_validate

    try:
        run_validate(loaded, loras, image, prompt, resolution, frames, steps, guidance, seed, distilled, fp8=fp8,
                     video=video, refine=refine, spatial_only=spatial_only)
    except ValueError as error:
        _fail(ConfigError([_argument_problem("validate", None, str(error), "see `longcat validate --help`")]))


@app.command()
def serve(
    config: ConfigOption,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default; another one needs "
                                           "--allow-remote and a token).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 7860,
    device: Annotated[str | None, typer.Option(help="cuda, mps or cpu (default: cuda when there is one).")] = None,
    allow_remote: Annotated[bool, _flag("--allow-remote", help="Listen on a non-loopback --host (anyone who can "
                                                             "reach it and has the token can render and read the run).")] = False,
    token: Annotated[str | None, typer.Option(help="Token every request must carry (default with --allow-remote: "
                                                   "a new one, printed in the link).")] = None,
    gpu_memory: Annotated[float | None, typer.Option(metavar="GiB", help="GPU memory renders must fit (default: "
                                                                         "this CUDA GPU's; unchecked on mps/cpu).")] = None,
    set_: SetOption = None,
) -> None:
    """Serve a local page to render and compare previews with the run's model and LoRAs."""
    problems = []
    if device is not None and device not in ("cuda", "mps", "cpu"):
        problems.append(_argument_problem("--device", device, "unknown device", "use cuda, mps or cpu"))
    if gpu_memory is not None and not (math.isfinite(gpu_memory) and gpu_memory > 0):
        problems.append(_argument_problem("--gpu-memory", gpu_memory, "not a positive number of GiB",
                                          "give the GPU's memory, e.g. --gpu-memory 80"))
    loaded = _load(config, set_)
    if problems:
        _fail(ConfigError(problems))
    try:
        from longcat_train.serve.access import AccessRefused, bind_token
        from longcat_train.serve.server import serve_run
    except ImportError as error:
        _fail(ConfigError([_argument_problem("serve", None, f"the web server is not installed ({error.name} missing)",
                                             'pip install "longcat-train[serve]" (Starlette and uvicorn)')]))
    from longcat_train.validation.previews import render_device

    try:
        token = bind_token(host, allow_remote, token)
    except AccessRefused as error:
        _fail(ConfigError([_argument_problem("--host", host, str(error), "keep the default --host 127.0.0.1, or "
                                             "add --allow-remote")]))
    try:
        render_device(device)
    except ValueError as error:
        _fail(ConfigError([_argument_problem("--device", device, str(error), "pick a device this machine has")]))
    serve_run(loaded, host, port, device, allow_remote, token, gpu_memory, _out())


@app.command()
def cache(config: ConfigOption, set_: SetOption = None) -> None:
    """Encode every missing latent (VAE) and caption embedding (umT5) into the caches."""
    loaded = _load(config, set_)
    from accelerate import PartialState

    from longcat_train.training.prepare import Shard, prepare_data

    # under `accelerate launch`, each process encodes its share of the missing entries
    state = PartialState()
    shard = Shard(state.process_index, state.num_processes, state.wait_for_everyone)
    data = prepare_data(loaded, state.device, _out(), shard)
    _out().print(f"cached {len(data.items)} training items, {len(data.eval_items)} eval items, "
                 f"{len(data.text_features)} prompts; {len(data.failed)} failed")


@config_app.command("check")
def config_check(
    config: ConfigOption,
    set_: SetOption = None,
    paths: Annotated[bool, _flag("--paths/--no-paths",
                                 help="Also check the checkpoint, dataset directories and resume path.")] = True,
    as_json: JsonOption = False,
) -> None:
    """Check config.json and its datasets file; print what they set up. Exit code 2 on problems."""
    loaded = _load(config, set_, as_json, check_files=paths)
    if as_json:
        _print_json({**problems_document(loaded.warnings), "config": str(loaded.config_path),
                     "datasets_file": str(loaded.backend_path), "paths_checked": paths,
                     "defaults_differing_from_simpletuner": differing_defaults(loaded)})
        return
    _out().print(config_summary(loaded))
    _out().print("[bold green]config OK[/]" + ("" if paths else " (files and directories not checked)"))


@config_app.command("init")
def config_init(
    directory: Annotated[Path, typer.Argument(help="Where to write config.json and multidatabackend.json.")],
    text_to_video: Annotated[bool, _flag("--t2v", help="The text-to-video example instead of image-to-video.")] = False,
    force: Annotated[bool, _flag("--force", help="Overwrite existing files.")] = False,
) -> None:
    """Write the example config.json and multidatabackend.json to edit."""
    try:
        written = write_example_configs(directory, "t2v" if text_to_video else "i2v", force)
    except ExistingFilesError as error:
        _fail(ConfigError([
            _argument_problem("DIRECTORY", str(p), "file exists; nothing was written", "pass --force to overwrite, or pick another directory")
            for p in error.paths
        ]))
    for path in written:
        _out().print(f"wrote {escape(str(path))}")
    _out().print(f"next: edit them, then [bold]longcat config check --config {escape(str(written[0]))}[/]")


@data_app.command("check", help="Scan the datasets: usable items, skipped files with reasons, buckets, pairing "
                                  f"(no GPU, no model). Exit code {EXIT_STOPPED} when a training dataset has no "
                                  "usable clips (`train` leaves it out, or stops), "
                                  f"{EXIT_CONFIG_ERROR} on config problems.")
def data_check(config: ConfigOption, set_: SetOption = None, as_json: JsonOption = False) -> None:
    loaded = _load(config, set_, as_json, check_model=False)
    from longcat_train.data import data_check_report
    from longcat_train.training.prepare import data_specs

    report = data_check_report(list(data_specs(loaded).values()), seed=loaded.training.seed,
                               trained={d.id for d in loaded.training_datasets})
    orientation = _orientation_warnings(loaded, report)
    if as_json:
        _print_json({**problems_document([*loaded.warnings, *orientation]), **report.as_json()})
    else:
        report.render(_out())
        if orientation:
            _err().print(warnings_table(orientation))
    if report.empty_training_datasets:
        raise typer.Exit(EXIT_STOPPED)


def _orientation_warnings(loaded: LoadedConfig, report) -> list[ConfigProblem]:
    """`validation_resolution` against the held-out clips' buckets (else the training buckets')."""
    from longcat_train.config.orientation import orientation_warning

    eval_id = loaded.training.eval_dataset_id
    held_out = [d for d in report.datasets if d.dataset_id == eval_id and d.buckets]
    reference, what = (held_out, "the held-out clips") if held_out else (
        [d for d in report.datasets if d.trained], "the training buckets")
    sizes = [size for d in reference for size in d.bucket_sizes()]
    training = loaded.training
    warning = orientation_warning(training.validation_resolution, training.validation_size, sizes, what,
                                  loaded.config_path)
    return [] if warning is None else [warning]


def _listed(words: list[str], last: str) -> str:
    """"a, b or c" (`last` "or") from the words."""
    return f"{', '.join(words[:-1])} {last} {words[-1]}" if len(words) > 1 else "".join(words)


# the LoRA formats' names and titles, from the config's table (no torch needed for --help)
_FORMAT_NAMES = list(LORA_FORMAT_CHOICES)
_FORMAT_TITLES = [choice.title for choice in LORA_FORMAT_CHOICES.values()]


@app.command("export-lora", help=f"Convert a LoRA file between the {_listed(_FORMAT_TITLES, 'and')} formats.")
def export_lora(
    source: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="A LoRA file we or the official code wrote.")],
    target: Annotated[Path, typer.Argument(help="The file to write.")],
    format_: Annotated[str, typer.Option("--format", help=f"{_listed(_FORMAT_NAMES, 'or')}.")] = _FORMAT_NAMES[0],
) -> None:
    if format_ not in LORA_FORMAT_CHOICES:
        _fail(ConfigError([_argument_problem("--format", format_, "unknown LoRA format",
                                             f"use {_listed(_FORMAT_NAMES, 'or')}")]))
    from longcat_train.lora import write_lora

    lora, problems = _read_lora("SOURCE", source)
    if problems:
        _fail(ConfigError(problems))
    write_lora(target, lora.weights, format_, lora.metadata)
    _out().print(f"wrote {escape(str(target))} ({format_}, {len(lora.weights.modules)} modules, read as {lora.format})")
    if format_ == "official":
        from longcat_train.lora.formats import OFFICIAL_RANK, official_network_dim

        dim = official_network_dim(lora.weights)
        if dim != OFFICIAL_RANK:  # every module is padded to this one rank; the loader's default is 128
            _out().print(f"load it with the official load_lora(..., lora_network_dim={dim}): its modules have rank {dim}")


@app.command()
def plan(
    config: ConfigOption,
    gpu_memory: Annotated[float | None, typer.Option(metavar="GiB", help="GPU memory to plan for (default: this GPU's).")] = None,
    host_memory: Annotated[float | None, typer.Option(metavar="GiB", help="Host RAM to plan for (default: this machine's).")] = None,
    gpus: Annotated[int, typer.Option(min=1, help="GPUs training together, on one machine.")] = 1,
    strategy: Annotated[str | None, typer.Option(
        metavar="ddp|fsdp|ulysses", help="How they share the work (default: the config's distributed_strategy).")] = None,
    link: Annotated[float, typer.Option(
        metavar="GB/s", min=0.1, help="Bandwidth between the GPUs for the throughput prediction (PCIe 4.0: 25).")] = 25.0,
    set_: SetOption = None,
    as_json: JsonOption = False,
) -> None:
    """Predict peak memory per GPU and per machine for each bucket, recommend settings that fit, and
    predict the step time and throughput of the largest bucket on --gpus GPUs."""
    overrides = [*(set_ or []), *([f"distributed_strategy={strategy}"] if strategy is not None else [])]
    loaded = _load(config, overrides, as_json, check_model=False)
    if gpu_memory is None:
        # asked before the planner's and the data pipeline's imports, which take seconds
        if not _cuda_available():
            _fail(ConfigError([_argument_problem("--gpu-memory", None, "no CUDA GPU here to read the memory of",
                                                 "pass --gpu-memory GiB, e.g. --gpu-memory 24")]), as_json)
        import torch

        gpu_memory = torch.cuda.get_device_properties(0).total_memory / 2**30
    from longcat_train.memory import machine_memory_gib, plan_memory, planned_config_keys
    from longcat_train.training.prepare import scan_datasets

    items = [item for scan in scan_datasets(loaded).values() for item in scan.items]
    buckets = sorted({(i.bucket.height, i.bucket.width, i.bucket.num_frames) for i in items})
    if not buckets:
        _fail(ConfigError([_argument_problem("datasets", None, "no usable clips to plan for",
                                             "run `longcat data check` to see why clips are skipped")]), as_json)
    from longcat_train.components import load_dit_config

    # the checkpoint's own architecture when it is there (the release's otherwise)
    dit_config = load_dit_config(loaded.training.pretrained_model_name_or_path or "")
    from longcat_train.distributed import predict_throughput
    from longcat_train.model.flops import dense_bf16_peak_flops

    host_memory = machine_memory_gib() if host_memory is None else host_memory
    cfg = loaded.training
    picked = planned_config_keys(cfg, buckets, gpu_memory, host_memory, dit_config, gpus)
    memory_plan = plan_memory(cfg.model_copy(update=picked), buckets, gpu_memory, dit_config, host_memory, gpus)
    largest = max(buckets, key=lambda bucket: bucket[0] * bucket[1] * bucket[2])
    speed = predict_throughput(largest, gpus, cfg.distributed_strategy, cfg.lora_rank, cfg.train_batch_size,
                               dit_config, dense_bf16_peak_flops(), link)
    if as_json:
        _print_json({**problems_document(loaded.warnings), **memory_plan.as_json(), "picked": picked,
                     "throughput": {**speed.as_json(), "bucket": list(largest), "link_gb_s": link}})
        return
    memory_plan.render(_out())
    if picked:
        _out().print("`train` sets these keys the config leaves unset (the fastest values that fit): "
                     + escape(", ".join(f"{key}={json.dumps(value)}" for key, value in picked.items())))
    _out().print(f"predicted on {gpus} GPU{'s' if gpus > 1 else ''} ({cfg.distributed_strategy}), bucket "
                 f"{'x'.join(map(str, largest))}: {speed.step_s:.1f} s per optimizer step ({speed.compute_s:.1f} s "
                 f"compute, {speed.communication_s:.1f} s moving data at {link:g} GB/s), {speed.samples_per_s:.3f} "
                 "clips/s; memory figures are per GPU, host RAM per machine", soft_wrap=True)


@app.command()
def bench(
    resolution: Annotated[str | None, typer.Option(
        metavar="HxW", help="Clip size (default 480x832; bsa: 720x1280 and 480x832).")] = None,
    frames: Annotated[int | None, typer.Option(help="Frames; (frames - 1) % 4 == 0 (default 93).")] = None,
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = 32,
    steps: Annotated[int | None, typer.Option(
        help="Measured steps (default 10; render: sampler steps per row, 3; memory: 2 per row; bsa: timed "
             "iterations, 10, --quick 3; e2e: optimizer steps of the whole run, 5 or more, default 8).")] = None,
    mode: Annotated[str, typer.Option(help="train, render (a preview render's cost per mode: exact, FP8, step "
                                            "cache, fewer steps, distilled; with PSNR against the exact render), "
                                            "vae, memory (s/step, peak VRAM and the planner's "
                                            "prediction per memory setting, one process per row), bsa (block-sparse "
                                            "attention against dense cuDNN SDPA, one layer), or e2e (the whole user "
                                            "path on a release-shaped checkpoint: cache, train, SIGKILL, resume, "
                                            "validate, bench).")] = "train",
    workdir: Annotated[Path, typer.Option(help="e2e: where the checkpoint, clips and run go (a complete "
                                               "checkpoint there is reused).")] = Path("e2e_run"),
    scale: Annotated[str, typer.Option(help="e2e: release (13.6B shapes, CUDA) or tiny (CPU).")] = "release",
    keep_projections: Annotated[str, typer.Option(
        help="Projection outputs selective checkpointing keeps: 'auto' (the most that fit this GPU and RAM), "
             "'none', or names from the config key keep_projections, comma-separated.")] = "auto",
    clips: Annotated[int, typer.Option(help="e2e: training clips written (one more is held out).")] = 5,
    skip: Annotated[str, typer.Option(help="e2e: phases left out, comma-separated: validate (the `validate "
                                           "--lora` render), bench (the `bench` comparison); render: quality "
                                           "(the PSNR renders), fp8, distilled (a timed distilled render with "
                                           "LoRA hooks), refine (a timed 720p refinement).")] = "",
    official: Annotated[Path | None, typer.Option(
        help="render: a checkout of meituan-longcat/LongCat-Video whose DiT step is timed beside ours.")] = None,
    rows: Annotated[str, typer.Option(help="memory: rows, comma-separated (default all): bf16, bf16-kept, "
                                           "int8-quanto, fp8-torchao, swap8, swap16, swap24, swap40, group-offload, "
                                           "cap24, cap48 (the planner's pick under a 24 / 48 GiB cap).")] = "",
    block_error: Annotated[bool, _flag("--block-error", help="memory: instead of rows, the relative error of one "
                                                            "full-size block per quantized precision.")] = False,
    quick: Annotated[bool, _flag("--quick", help="bsa: one small grid, a smoke run.")] = False,
) -> None:
    """Benchmark full-size training steps (random weights, no checkpoint); prints one JSON line (--mode: other
    benchmarks)."""
    problems: list[ConfigProblem] = []
    # bsa without --resolution times the release's two sizes; every other mode one clip size
    bsa_resolution = resolution
    resolution, frames = resolution or "480x832", frames or 93
    for option, value, rule in (("--resolution", resolution, parse_resolution), ("--frames", frames, check_frames)):
        try:
            rule(value)  # type: ignore[operator]
        except PydanticCustomError as error:
            problems.append(_argument_problem(option, value, error.message(), str((error.context or {}).get("fix", ""))))
    if mode not in ("train", "render", "vae", "memory", "bsa", "e2e"):
        problems.append(_argument_problem("--mode", mode, "unknown mode",
                                          "use train, render, vae, memory, bsa or e2e"))
    if steps is None:  # each mode's default; bsa's (10 timed iterations, --quick 3) is its own
        # e2e: 8 ends on a validation (every 4 steps, and after the last), so no extra render
        steps = {"memory": 2, "bsa": None, "e2e": 8, "render": 3}.get(mode, 10)
    if mode == "memory":
        from longcat_train.bench_memory import ROWS

        unknown_rows = sorted(set(filter(None, rows.split(","))) - set(ROWS))
        if unknown_rows:
            problems.append(_argument_problem("--rows", rows, f"unknown rows {unknown_rows}",
                                              f"use rows from {', '.join(ROWS)}, comma-separated"))
    if mode == "e2e" and steps <= 4:
        problems.append(_argument_problem("--steps", steps, "e2e kills the run after step 3 and resumes it",
                                          "give --steps 5 or more"))
    if scale not in ("release", "tiny"):
        problems.append(_argument_problem("--scale", scale, "unknown scale", "use release or tiny"))
    from longcat_train.release_facts import PROJECTION_MODULES

    kept = {"auto": None, "none": ()}.get(keep_projections, tuple(filter(None, keep_projections.split(","))))
    unknown = sorted(set(kept or ()) - set(PROJECTION_MODULES))
    if unknown:
        problems.append(_argument_problem("--keep-projections", keep_projections, f"unknown projections {unknown}",
                                          f"use auto, none or names from {sorted(PROJECTION_MODULES)}"))
    skipped = set(filter(None, skip.split(",")))
    phases = {"render": {"quality", "fp8", "distilled", "refine"}}.get(mode, {"validate", "bench"})
    if skipped - phases:
        problems.append(_argument_problem("--skip", skip, f"unknown phases {sorted(skipped - phases)}",
                                          f"use {', '.join(sorted(phases))}, comma-separated"))
    if official is not None and not (official / "longcat_video" / "modules" / "longcat_video_dit.py").is_file():
        problems.append(_argument_problem("--official", str(official), "not a LongCat-Video checkout",
                                          "give the folder that holds longcat_video/ (meituan-longcat/LongCat-Video)"))
    if clips < 1:
        problems.append(_argument_problem("--clips", clips, "e2e needs a training clip", "give --clips 1 or more"))
    if problems:
        _fail(ConfigError(problems))
    if mode == "e2e":
        from longcat_train.bench_e2e import E2EFailed, E2ESettings, run_e2e

        if scale == "release" and not _cuda_available():
            _err().print("[bold red]bench:[/] --scale release needs a CUDA GPU (use --scale tiny on the CPU)")
            raise typer.Exit(EXIT_STOPPED)
        try:
            run_e2e(E2ESettings(workdir, scale, resolution, frames, rank, steps=steps, clips=clips,
                                bench="bench" not in skipped, validate="validate" not in skipped), _out())
        except E2EFailed as error:
            _err().print(f"[bold red]bench e2e:[/] {escape(str(error))}")
            raise typer.Exit(EXIT_STOPPED) from None
        return
    try:
        if mode == "memory":
            from longcat_train.bench_memory import ROWS, MemoryBenchSettings, run_memory_bench

            run_memory_bench(MemoryBenchSettings(rows=tuple(filter(None, rows.split(","))) or ROWS,
                                                 resolution=resolution, frames=frames, rank=rank, steps=steps,
                                                 block_error=block_error))
        elif mode == "render":
            from longcat_train.bench_render import RenderBenchSettings, run_render_bench

            run_render_bench(RenderBenchSettings(resolution=resolution, frames=frames, steps=steps, official=official,
                                                 skipped=tuple(sorted(skipped))))
        elif mode == "bsa":
            from longcat_train.bench_bsa import BsaBenchSettings, run_bsa_bench

            run_bsa_bench(BsaBenchSettings.for_bench(bsa_resolution, frames, steps, quick))
        else:
            from longcat_train.bench import BenchSettings, run_bench

            run_bench(BenchSettings(mode=mode, resolution=resolution, frames=frames, rank=rank, steps=steps,
                                    keep_projections=kept))
    except RuntimeError as error:
        _err().print(f"[bold red]bench:[/] {escape(str(error))}")
        raise typer.Exit(EXIT_STOPPED) from None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@app.command()
def demo(
    output_dir: Annotated[Path, typer.Option(help="Where the tiny model, data and run go.")] = Path("demo_run"),
) -> None:
    """Make a tiny random LongCat-Video and a synthetic paired dataset, then train on the CPU."""
    from longcat_train.demo.synthetic import write_demo

    config_path = write_demo(output_dir)
    _out().print(f"wrote a tiny random LongCat-Video, synthetic paired clips and {escape(str(config_path))}")
    result = _run_training(_load(config_path, None))
    losses = [loss for _, loss in result.losses]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    _out().print(f"[bold green]demo done[/]: loss {first:.4f} (first 10 steps) → {last:.4f} (last 10), "
                 f"{100 * (1 - last / first):.0f}% lower; outputs in {escape(str(output_dir / 'output'))}")


if __name__ == "__main__":
    app()
