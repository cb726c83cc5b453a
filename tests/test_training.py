"""The training step against a hand computation, and the loop's promises: exact resume after a
SIGKILL, the demo's falling loss, and stopping cleanly on non-finite losses."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from longcat_train.config import load_config
from longcat_train.objective.flow import sample_sigmas, shift_sigmas
from longcat_train.training.loss_plot import loss_series, read_events
from longcat_train.training.loop import TrainingStopped, run_training
from longcat_train.objective.loss import flow_matching_loss
from longcat_train.objective.strategy import ImageToVideo, TextToVideo

from .reference import load_reference, reference_model


def test_training_loss_equals_a_hand_computation():
    t, _ = load_reference()
    model = reference_model()
    g = torch.Generator().manual_seed(0)
    x0 = t["inputs.hidden_states"]
    noise = torch.randn(x0.shape, generator=g)
    start = torch.randn(x0[:, :, :1].shape, generator=g)
    sigmas = sample_sigmas(2, torch.Generator().manual_seed(1))
    text, mask = t["inputs.encoder_hidden_states"], t["inputs.encoder_attention_mask"]

    s = sigmas.view(-1, 1, 1, 1, 1)
    noisy = (1 - s) * x0 + s * noise
    noisy[:, :, :1] = start
    timestep = (sigmas * 1000)[:, None].repeat(1, 3)
    timestep[:, 0] = 0
    with torch.no_grad():
        pred = model(noisy, timestep, text, mask, num_cond_latents=1)
        by_hand = (pred[:, :, 1:] - (x0 - noise)[:, :, 1:]).square().mean()
        loss, batch = flow_matching_loss(model, x0, noise, sigmas, text, mask, ImageToVideo(), start)
    assert torch.allclose(loss, by_hand, rtol=1e-6)
    assert torch.equal(batch.hidden_states[:, :, 0], start[:, :, 0])

    with torch.no_grad():
        t2v_loss, t2v = flow_matching_loss(model, x0, noise, sigmas, text, mask, TextToVideo())
        pred = model(t2v.hidden_states, (sigmas * 1000)[:, None].repeat(1, 3), text, mask)
    assert torch.allclose(t2v_loss, (pred - (x0 - noise)).square().mean(), rtol=1e-6)


def test_condition_frame_gets_no_gradient_through_the_loss():
    t, _ = load_reference()
    model = reference_model()
    x0 = t["inputs.hidden_states"]
    captured = {}

    def keep(_m, _args, output):
        output.retain_grad()
        captured["pred"] = output
        return output

    model.register_forward_hook(keep)
    loss, _ = flow_matching_loss(model, x0, torch.randn_like(x0), torch.tensor([0.5, 0.9]),
                                 t["inputs.encoder_hidden_states"], t["inputs.encoder_attention_mask"], ImageToVideo())
    loss.backward()
    grad = captured["pred"].grad
    assert torch.count_nonzero(grad[:, :, 0]) == 0
    assert torch.count_nonzero(grad[:, :, 1:]) > 0


def test_sigmas_are_shifted_like_the_checkpoint_scheduler():
    u = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(shift_sigmas(u, 12.0), 12 * u / (1 + 11 * u))
    a = sample_sigmas(64, torch.Generator().manual_seed(3))
    assert torch.equal(a, sample_sigmas(64, torch.Generator().manual_seed(3)))
    assert a.median() > 0.8  # shift 12 puts most of the mass at high noise, as inference does


def _final_lora(output: Path) -> dict:
    return load_file(str(output / "lora.safetensors"))


def test_resume_after_sigkill_ends_with_the_identical_lora(demo_root, tmp_path):
    config = demo_root / "config.json"
    common = ("max_train_steps=40", "checkpoint_step_interval=5", "checkpoints_total_limit=null",
              "validation_steps=null")
    straight = tmp_path / "straight"
    run_training(load_config(config, (*common, f"output_dir={straight}")))

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "longcat_train.cli", "train", "--config", str(config),
            *(x for c in (*common, f"output_dir={killed}") for x in ("--set", c))]
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_after = random.Random().choice([5, 10, 15, 20])
    deadline = time.time() + 300
    while not (killed / f"checkpoint-{kill_after}").is_dir():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.005)
    time.sleep(random.Random().uniform(0, 0.05))
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "lora.safetensors").exists(), "the run finished before the kill"

    run_training(load_config(config, (*common, f"output_dir={killed}", "resume_from_checkpoint=latest")))
    a, b = _final_lora(straight), _final_lora(killed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the loss EMA restored from the checkpoint: the resumed run logs the uninterrupted run's values
    assert loss_series(read_events(killed / "events.jsonl"))["ema"] == loss_series(read_events(straight / "events.jsonl"))["ema"]


def test_demo_loss_falls_and_writes_checkpoints(demo_root, tmp_path):
    from typer.testing import CliRunner

    from longcat_train.cli import app

    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--output-dir", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "demo done" in result.output
    match = re.search(r"demo done: loss ([\d.]+) \(first 10 steps\) → ([\d.]+)", result.output)
    first, last = float(match.group(1)), float(match.group(2))
    assert last <= 0.7 * first
    output = out / "output"
    assert (output / "lora.safetensors").is_file() and (output / "loss.png").is_file()
    assert [p.name for p in sorted(output.glob("checkpoint-*"))] == ["checkpoint-150", "checkpoint-300"]
    assert any((output / "logs").iterdir())
    events = [json.loads(line) for line in (output / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events][:2] == ["start", "step"] and events[-1]["event"] == "done"
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 301))
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [150, 300]
    assert events[0]["cached_at"] <= events[0]["loaded_at"] <= steps[0]["time"]
    assert all(e["loss"] > 0 and e["s_per_step"] > 0 for e in steps)


def test_non_finite_losses_stop_with_a_checkpoint(demo_root, tmp_path, monkeypatch):
    from longcat_train.training import loop

    real_loss, calls = loop.flow_matching_loss, []

    def diverging_loss(*args, **kwargs):  # finite for two batches, then NaN (fp8 overflow, bad clip)
        loss, parts = real_loss(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) > 2 else loss), parts

    monkeypatch.setattr(loop, "flow_matching_loss", diverging_loss)
    out = tmp_path / "nan"
    loaded = load_config(demo_root / "config.json", ("max_train_steps=40", "validation_steps=null",
                                                     f"output_dir={out}"))
    with pytest.raises(TrainingStopped, match="non-finite losses in a row; saved"):
        run_training(loaded)
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]


def test_validation_during_training_leaves_the_loss_trajectory_identical(demo_root, tmp_path):
    config = demo_root / "config.json"
    common = ("max_train_steps=12", "checkpoint_step_interval=12")
    plain = run_training(load_config(config, (*common, "validation_steps=null", f"output_dir={tmp_path / 'a'}")))
    validated = run_training(load_config(config, (*common, "validation_steps=5", "validation_on_startup=true",
                                                  f"output_dir={tmp_path / 'b'}")))
    assert [v for _, v in plain.losses] == [v for _, v in validated.losses]
    renders = sorted(p.name for p in (tmp_path / "b" / "validation").iterdir())
    assert renders == ["step_0", "step_10", "step_12", "step_5"]  # every 5 steps, and after the last one
    assert list((tmp_path / "b" / "validation" / "step_5").glob("*.mp4"))
