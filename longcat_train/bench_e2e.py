"""`longcat bench --mode e2e`: the main job the way a user runs it, on a checkpoint with the release's
layout and shapes (random weights) and real clips on disk.

It writes the checkpoint (`demo/release_model.py`) and 30 fps clips with captions, start
frames and a held-out split, then runs the real commands as child processes, one after another:
`longcat cache`; `longcat train` (a checkpoint every 2 steps, periodic validation), SIGKILLed once
it has logged step 3; the same `train` resumed from checkpoint-2 to the end (its step 3 must repeat
the killed run's exactly); `longcat
validate --lora` with the trained LoRA; and `longcat bench` with the same shape and rank. It prints
one table and writes every figure to `e2e_results.json` as each phase ends (so a run cut short
still leaves what it measured). `--scale tiny` does the same with a tiny model on the CPU (tests).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .demo.synthetic import demo_configs, write_dataset

KILL_AFTER_STEP = 3  # the run is killed once it has logged this step; it checkpoints every 2
CHECKPOINT_EVERY = 2  # so checkpoint-2 holds the state the resumed run repeats step 3 from
VALIDATE_EVERY = 4
RESULTS_FILE = "e2e_results.json"


@dataclass
class E2ESettings:
    workdir: Path
    scale: str = "release"  # "release": the 13.6B shapes on CUDA; "tiny": the demo's sizes on the CPU
    resolution: str = "480x832"
    frames: int = 93
    rank: int = 32
    steps: int = 5  # optimizer steps of the whole run (the kill comes after step 3)
    clips: int = 5
    render_steps: int = 2  # sampler steps of each validation render
    bench: bool = True  # also time `longcat bench` on the same shape (CUDA only)
    validate: bool = True  # also render with `longcat validate --lora`


class E2EFailed(RuntimeError):
    """A phase of the run failed; the message names it and its log."""


def _write_checkpoint(settings: E2ESettings, root: Path) -> dict:
    from .demo.release_model import write_release_model

    if settings.scale == "release":
        return write_release_model(root, "cuda")
    from .demo.tiny_model import TINY_DIT_CONFIG, TINY_VAE_CONFIG, tiny_umt5_config
    from .release_facts import RELEASE_VOCAB_SIZE

    umt5 = tiny_umt5_config(RELEASE_VOCAB_SIZE, TINY_DIT_CONFIG["caption_channels"]).to_dict()
    return write_release_model(root, "cpu", dit_config=TINY_DIT_CONFIG, umt5_config=umt5, vae_config=TINY_VAE_CONFIG)


def _write_run(settings: E2ESettings, model: Path) -> Path:
    """Clips (30 fps sources of twice the frames, which the loader resamples to 15 fps) and configs;
    the memory keys stay unset on the release scale, so `train` picks them as for a new user."""
    height, width = (int(v) for v in settings.resolution.lower().split("x"))
    data = settings.workdir / "data"
    if not data.is_dir():
        write_dataset(data, count=settings.clips, val_count=1, shapes={"clip": (height, width)},
                      frames=2 * settings.frames - 1)
    overrides = {
        "max_train_steps": settings.steps, "checkpoint_step_interval": CHECKPOINT_EVERY,
        "checkpoints_total_limit": None, "validation_step_interval": VALIDATE_EVERY, "lora_rank": settings.rank,
        "validation_resolution": settings.resolution, "validation_num_video_frames": settings.frames,
        "validation_num_inference_steps": settings.render_steps, "aspect_bucket_alignment": 16,
    }
    if settings.scale == "release":
        overrides |= {"base_model_precision": "bf16", "mixed_precision": "bf16", "learning_rate": 1e-4}
    config = demo_configs(settings.workdir, model, resolution=min(height, width), num_frames=settings.frames,
                          overrides=overrides)
    if settings.scale == "release":
        values = json.loads(config.read_text())
        values.pop("gradient_checkpointing")  # the demo's CPU choice; a user leaves it to the plan
        config.write_text(json.dumps(values, indent=2))
    return config


@dataclass
class Child:
    """One finished command: wall seconds, peak host RSS (GiB) and its log file."""

    seconds: float
    peak_rss_gib: float
    log: Path
    killed: bool = False


def _run(phase: str, args: list[str], workdir: Path, kill_when=None) -> Child:
    """Runs `python -m longcat_train.cli ARGS`, output to logs/PHASE.log; with `kill_when()`,
    SIGKILLs the child once it returns True (polled every 50 ms)."""
    log = workdir / "logs" / f"{phase}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "160"}
    start = time.time()
    with open(log, "w") as handle:
        child = subprocess.Popen([sys.executable, "-m", "longcat_train.cli", *args], stdout=handle,
                                 stderr=subprocess.STDOUT, env=env, cwd=workdir)
        killed = False
        while kill_when is not None and child.poll() is None:
            if kill_when():
                child.send_signal(signal.SIGKILL)
                killed = True
                break
            time.sleep(0.05)
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.time() - start
    code = os.waitstatus_to_exitcode(status)
    if not killed and code != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise E2EFailed(f"{phase} exited {code}; its log is {log}:\n{tail}")
    return Child(seconds, usage.ru_maxrss / 2**20, log, killed)


def _events(output: Path) -> list[dict]:
    path = output / "events.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _runs(events: list[dict]) -> list[list[dict]]:
    """The events split into one list per `train` process (each begins with "start")."""
    runs: list[list[dict]] = []
    for event in events:
        if event["event"] == "start":
            runs.append([])
        if runs:
            runs[-1].append(event)
    return runs


def _run_figures(run: list[dict], launched: float) -> dict:
    start, steps = run[0], [e for e in run if e["event"] == "step"]
    first = steps[0] if steps else None
    return {
        "first_step": first["step"] if first else None,
        "launch_to_first_step_s": round(first["time"] - launched, 1) if first else None,
        "cached_to_first_step_s": round(first["time"] - start["cached_at"], 1) if first else None,
        "loaded_to_first_step_s": round(first["time"] - start["loaded_at"], 1) if first else None,
        # caching → first step, in order: weights in place, waited for pinning and kernel warm-up,
        # LoRA / optimizer / trackers set up, the first step itself
        "load_s": round(start["weights_at"] - start["cached_at"], 1),
        "pin_warmup_wait_s": round(start["loaded_at"] - start["weights_at"], 1),
        "setup_s": round(start["ready_at"] - start["loaded_at"], 1),
        "first_step_s": round(first["time"] - start["ready_at"], 1) if first else None,
        "warmup_s": start["warmup_seconds"], "warmup_error": start["warmup_error"],
        "steady_s_per_step": [round(e["s_per_step"], 3) for e in steps[1:]],
        "memory": start["memory"], "picked": start["picked"],
    }


def run_e2e(settings: E2ESettings, console=None) -> dict:
    from rich.console import Console

    console = console or Console()
    workdir = settings.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict = {"settings": {**asdict(settings), "workdir": str(workdir)}}

    def save(key: str, value) -> None:
        results[key] = value
        (workdir / RESULTS_FILE).write_text(json.dumps(results, indent=2))
        console.print(f"[bold]{key}[/]: {json.dumps(value)}")

    started = time.time()
    facts = _write_checkpoint(settings, workdir / "model")
    save("checkpoint", {**facts, "seconds": round(time.time() - started, 1)})
    config = _write_run(settings, workdir / "model")
    output = workdir / "output"
    train_args = ["train", "--config", str(config)]

    cache = _run("cache", ["cache", "--config", str(config)], workdir)
    entries = 2 * (settings.clips + 1)  # each clip and its start frame, training and held out
    save("cache", {"seconds": round(cache.seconds, 1), "clips_per_s": round((settings.clips + 1) / cache.seconds, 3),
                   "latent_entries": entries, "peak_rss_gib": round(cache.peak_rss_gib, 2)})

    def logged_kill_step() -> bool:
        return any(e["event"] == "step" and e["step"] >= KILL_AFTER_STEP for e in _events(output))

    launched = time.time()
    first = _run("train", train_args, workdir, kill_when=logged_kill_step)
    save("train_killed", {**_run_figures(_runs(_events(output))[0], launched), "seconds": round(first.seconds, 1),
                          "killed": first.killed, "peak_rss_gib": round(first.peak_rss_gib, 2)})
    launched = time.time()
    # from the checkpoint before the kill by name: a fast tiny run may have saved the next one too
    checkpoint = output / f"checkpoint-{KILL_AFTER_STEP - 1}"
    second = _run("resume", [*train_args, "--set", f"resume_from_checkpoint={checkpoint}"], workdir)
    runs = _runs(_events(output))
    resumed = _run_figures(runs[-1], launched)
    save("train_resumed", {**resumed, "seconds": round(second.seconds, 1), "peak_rss_gib": round(second.peak_rss_gib, 2),
                           "validations_s": [round(e["seconds"], 1) for e in runs[-1] if e["event"] == "validation"]})

    losses = [{e["step"]: e["loss"] for e in run if e["event"] == "step"} for run in (runs[0], runs[-1])]
    overlap = sorted(set(losses[0]) & set(losses[1]))
    save("resume", {"steps_compared": overlap,
                    "max_abs_loss_difference": max((abs(losses[0][s] - losses[1][s]) for s in overlap), default=None),
                    "identical": bool(overlap) and all(losses[0][s] == losses[1][s] for s in overlap)})
    steps = [e for run in runs for e in run if e["event"] == "step"]
    steady = [s for run in (results["train_killed"], resumed) for s in run["steady_s_per_step"]]
    save("train", {"median_s_per_step": round(statistics.median(steady), 3) if steady else None,
                   "peak_vram_gib": round(max(e.get("peak_vram_gib", 0.0) for e in steps), 2),
                   "peak_rss_gib": round(max(first.peak_rss_gib, second.peak_rss_gib), 2)})

    if settings.validate:
        render = _run("validate", ["validate", "--config", str(config), "--lora", str(output / "lora.safetensors")],
                      workdir)
        videos = sorted(str(p.relative_to(workdir)) for p in (output / "validation").rglob("validate_*/*.mp4"))
        save("validate", {"seconds": round(render.seconds, 1), "videos": videos,
                          "peak_rss_gib": round(render.peak_rss_gib, 2)})
    if settings.bench and settings.scale == "release":
        bench = _run("bench", ["bench", "--mode", "train", "--resolution", settings.resolution, "--frames",
                               str(settings.frames), "--rank", str(settings.rank), "--steps", "2"], workdir)
        line = [x for x in bench.log.read_text().splitlines() if x.startswith("{")][-1]
        figures = json.loads(line)
        save("bench", {key: figures[key] for key in ("s_per_step", "warmup_s_per_step", "pin_seconds", "kernel_warmup",
                                                        "peak_vram_gib", "host_pinned_gib", "host_peak_rss_gib")}
             | {"keep_projections": figures["settings"]["keep_projections"]})
    console.print(e2e_table(results))
    return results


def e2e_table(results: dict):
    """The one table a developer reads: time to first step, s/step beside bench, memory, caching,
    rendering and resume equality."""
    from rich.table import Table

    s = results["settings"]
    table = Table(title=f"e2e {s['scale']} {s['resolution']}x{s['frames']}, LoRA rank {s['rank']}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    killed, resumed, train = results["train_killed"], results["train_resumed"], results["train"]
    rows = [
        ("checkpoint written (s; DiT, text encoder dtypes)",
         f"{results['checkpoint']['seconds']}; {results['checkpoint']['dit_dtype']}, "
         f"{results['checkpoint']['text_encoder_dtype']}"),
        ("cache: s, clips/s", f"{results['cache']['seconds']}, {results['cache']['clips_per_s']}"),
        ("first step after caching (s), cold / warm tuning cache",
         f"{killed['cached_to_first_step_s']} / {resumed['cached_to_first_step_s']}"),
        ("of which load / wait for pinning+warm-up / set-up / first step (s), cold",
         " / ".join(str(killed[k]) for k in ("load_s", "pin_warmup_wait_s", "setup_s", "first_step_s"))),
        ("the same, warm", " / ".join(str(resumed[k]) for k in ("load_s", "pin_warmup_wait_s", "setup_s",
                                                                 "first_step_s"))),
        ("kernel warm-up during loading (s), cold / warm", f"{killed['warmup_s']} / {resumed['warmup_s']}"),
        ("launch to first step (s), cold / warm",
         f"{killed['launch_to_first_step_s']} / {resumed['launch_to_first_step_s']}"),
        ("train s/step (median, first steps left out)", train["median_s_per_step"]),
        ("memory keys picked by train", ", ".join(killed["picked"]) or "none"),
        ("peak VRAM (GiB)", train["peak_vram_gib"]),
        ("peak host RSS of train (GiB)", train["peak_rss_gib"]),
        ("periodic validation render (s)", ", ".join(map(str, resumed["validations_s"])) or "-"),
        ("resume: steps compared, identical",
         f"{results['resume']['steps_compared']}, {results['resume']['identical']}"),
    ]
    if "validate" in results:
        rows.append(("validate --lora (s, whole command)", results["validate"]["seconds"]))
    if "bench" in results:
        bench = results["bench"]["s_per_step"]
        rows.append(("bench s/step (same shape, rank, kept projections auto)", bench))
        rows.append(("bench: pinning, kernel warm-up, first two steps (s)",
                     f"{results['bench']['pin_seconds']}, {results['bench']['kernel_warmup']['warmup_seconds']}, "
                     + ", ".join(map(str, results["bench"]["warmup_s_per_step"]))))
        if train["median_s_per_step"]:
            rows.append(("train / bench", f"{train['median_s_per_step'] / bench:.3f}"))
    for name, value in rows:
        table.add_row(name, str(value))
    return table
