"""`longcat train` around its steps, as the user sees it from a shell: progress lines in a log
file, one run per output_dir, and Ctrl-C / kill stopping with a checkpoint that resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from longcat_train.demo.synthetic import demo_configs, write_dataset
from longcat_train.demo.tiny_model import write_tiny_model
from longcat_train.run_lock import LOCK_FILE, DirectoryInUse, hold_directory

STEPS = 6


def _project(root: Path) -> Path:
    """A demo project under `root` (model, clips, configs): 6 steps, a checkpoint every 2, no
    validation renders."""
    model = write_tiny_model(root / "model")
    write_dataset(root / "data", count=3, val_count=1)
    return demo_configs(root, model, steps=STEPS, overrides={"checkpoint_step_interval": 2,
                                                              "validation_step_interval": None, "checkpoints_total_limit": None})


def _train(config: Path, *extra: str, log: Path | None = None, **popen) -> subprocess.Popen:
    out = open(log, "w") if log else subprocess.PIPE
    return subprocess.Popen([sys.executable, "-m", "longcat_train.cli", "train", "--config", str(config), *extra],
                            stdout=out, stderr=subprocess.PIPE, text=True, cwd=config.parent,
                            env={**os.environ, "COLUMNS": "200"}, **popen)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A demo project whose 6-step run finished uninterrupted, its progress written to train.log:
    the tests below read it and never write into its output_dir."""
    config = _project(tmp_path_factory.mktemp("finished"))
    run = _train(config, log=config.parent / "train.log")
    _, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr
    return config


def test_a_log_file_gets_progress_lines(finished: Path) -> None:
    lines = [line for line in (finished.parent / "train.log").read_text().splitlines() if line.startswith("step ")]
    assert lines[0].startswith("step 1/6 loss ") and lines[-1].startswith("step 6/6 loss ")
    assert all(" s/step " in line and " ETA " in line for line in lines)


def test_resuming_with_another_lora_shape_says_what_differs(finished: Path) -> None:
    # what differs and the ways out, no traceback
    changed = _train(finished, "--set", "resume_from_checkpoint=latest", "--set", "lora_rank=8",
                     "--set", "max_train_steps=8")
    _, stderr = changed.communicate(timeout=300)
    assert changed.returncode == 1
    assert "lora_rank=16 in the checkpoint, 8 in this config" in stderr and "--set lora_rank=16" in stderr
    assert "Traceback" not in stderr


def test_a_second_train_into_a_running_trains_output_dir_is_refused_naming_the_first(finished: Path,
                                                                                   tmp_path: Path) -> None:
    config, output = finished, ("--set", f"output_dir={tmp_path}")
    first = _train(config, *output, "--set", "max_train_steps=100000", log=tmp_path / "first.log")
    lock = tmp_path / LOCK_FILE
    try:
        deadline = time.monotonic() + 300
        while not (lock.is_file() and f'"pid": {first.pid}' in lock.read_text()):  # the first holds it
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.stderr else ""
            time.sleep(0.2)
        second = _train(config, *output)
        _, stderr = second.communicate(timeout=300)
    finally:
        first.kill()
        first.communicate()
    assert second.returncode == 1
    assert f"PID {first.pid}" in stderr and "output_dir" in stderr and "Traceback" not in stderr


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 999_999_999, "host": "gone", "started": 0}))
    with hold_directory(tmp_path, "first"):  # nobody holds the flock: the stale file does not matter
        try:
            with hold_directory(tmp_path, "second"):
                raise AssertionError("a held directory was taken twice")
        except DirectoryInUse as error:
            assert f"PID {os.getpid()}" in str(error)


def test_sigint_stops_with_a_checkpoint_and_the_resume_ends_bit_identical(finished: Path, tmp_path: Path) -> None:
    # the uninterrupted run is `finished`'s (which also wrote the caches this run reads)
    config, interrupted = finished, tmp_path / "interrupted"
    elsewhere = ("--set", f"output_dir={interrupted}")
    events = interrupted / "events.jsonl"
    run = _train(config, *elsewhere)
    deadline = time.time() + 600
    while time.time() < deadline and run.poll() is None:
        steps = [json.loads(line) for line in events.read_text().splitlines()] if events.is_file() else []
        if any(e["event"] == "step" and e["step"] >= 3 for e in steps):
            run.send_signal(signal.SIGINT)
            break
        time.sleep(0.05)
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 130, stderr
    assert "Resume with: longcat train" in stderr
    stopped = [json.loads(line) for line in events.read_text().splitlines() if '"interrupted"' in line][-1]
    assert stopped["step"] < STEPS and (interrupted / f"checkpoint-{stopped['step']}").is_dir()

    resumed = _train(config, *elsewhere, "--set", "resume_from_checkpoint=latest")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    final, reference = (load_file(out / "lora.safetensors") for out in (interrupted, config.parent / "output"))
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[key], reference[key]) for key in final)  # bit for bit


def test_a_batch_size_no_bucket_can_fill_is_refused_naming_the_buckets(finished: Path, tmp_path: Path) -> None:
    run = _train(finished, "--set", f"output_dir={tmp_path}", "--set", "train_batch_size=50")
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 1
    assert "no batch of train_batch_size=50" in stderr and "items" in stderr and "Traceback" not in stderr


def test_rerunning_a_finished_run_says_so_and_exits_0(finished: Path) -> None:
    again = _train(finished, "--set", "resume_from_checkpoint=latest")
    stdout, stderr = again.communicate(timeout=600)
    assert again.returncode == 0, stderr
    assert f"holds a finished run ({STEPS} of {STEPS} steps)" in stdout


def test_non_finite_lora_weights_are_never_saved(tmp_path: Path, monkeypatch) -> None:
    from longcat_train.config import load_config
    from longcat_train.training import loop

    config = _project(tmp_path)
    step = loop.TrainingRun.step

    def diverging_step(run):  # what an exploding update leaves behind, injected after a real step
        done = step(run)
        with torch.no_grad():
            run.params[0].fill_(float("nan"))
        return done

    monkeypatch.setattr(loop.TrainingRun, "step", diverging_step)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(loop.TrainingStopped, match="not finite at step 1; not saved"):
        loop.run_training(load_config(config, ("checkpoint_step_interval=1",)))
    assert not list((tmp_path / "output").glob("checkpoint-*"))
