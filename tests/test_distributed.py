"""Several processes on the CPU (gloo) through torchrun, as `accelerate launch` runs them on GPUs:
the lr schedule counts optimizer steps once, N processes × batch 1 train the LoRA that 1 process
with gradient accumulation N trains (with the base weights whole, or sharded by FSDP), and so do
2 processes sharing each sample's tokens (Ulysses) and 1 process; a checkpoint resumes on another
number of processes when processes × accumulation stays the same (and is refused, saying so, when
it does not), also on two "machines" on loopback.

One launch runs every multi-process case (a launch costs tens of seconds on two cores); the
single-process references run in this process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers.optimization import get_scheduler
from safetensors.torch import load_file

from longcat_train.config import load_config
from longcat_train.training.loop import TrainingStopped, run_training

pytestmark = pytest.mark.slow

STEPS = 4
# the LoRA after 4 AdamW steps: gradients averaged by all-reduce or by accumulation differ in rounding only
LORA_TOLERANCE = {"rtol": 1e-4, "atol": 1e-6}
COMMON = (f"max_train_steps={STEPS}", "validation_steps=null", "checkpoints_total_limit=null", "lr_warmup_steps=2")
RUNS = {  # name: the overrides of one 2-process run
    "linear": ("lr_scheduler=linear", f"checkpoint_step_interval={STEPS}"),
    "cosine": ("lr_scheduler=cosine", "checkpoint_step_interval=2"),
    # the base weights sharded, recomputed in backward (gathered again), and rendered by both processes
    "fsdp": ("lr_scheduler=cosine", "checkpoint_step_interval=2", "distributed_strategy=fsdp",
             "gradient_checkpointing=true", f"validation_steps={STEPS}"),
    # each sample's tokens split over both processes, rendered by the main one alone
    "ulysses": ("lr_scheduler=cosine", f"checkpoint_step_interval={STEPS}", "distributed_strategy=ulysses",
                f"validation_steps={STEPS}"),
}


def _sets(overrides) -> list[str]:
    return [x for o in overrides for x in ("--set", o)]


@pytest.fixture(scope="module")
def two_processes(demo_root, tmp_path_factory):
    """Every 2-process run of this file in one launch: {name: output_dir}, and the launch's stdout."""
    out = tmp_path_factory.mktemp("two_processes")
    runs = [["train", "--config", str(demo_root / "config.json"), *_sets((*COMMON, *overrides, f"output_dir={out / name}"))]
            for name, overrides in RUNS.items()]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(Path(__file__).with_name("distributed_cli.py")), json.dumps(runs)]
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [f"[run {i} exit 0]" in result.stdout for i in range(len(runs))] == [True] * len(runs), result.stderr[-3000:]
    return {name: out / name for name in RUNS}, result.stdout


def _step_lrs(output_dir: Path) -> list[float]:
    events = [json.loads(line) for line in (output_dir / "events.jsonl").read_text().splitlines()]
    return [e["lr"] for e in events if e["event"] == "step"]


def _train_one_process(demo_root: Path, output_dir: Path, *overrides: str):
    return run_training(load_config(demo_root / "config.json", (*COMMON, *overrides, f"output_dir={output_dir}")))


def _assert_same_lora(path_a: Path, path_b: Path) -> None:
    a, b = load_file(str(path_a)), load_file(str(path_b))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], **LORA_TOLERANCE, msg=key)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k or "lora_up" in k)  # it trained


def test_only_the_main_process_prints_and_every_rank_keeps_its_random_state(two_processes):
    runs, stdout = two_processes
    assert stdout.count("× 2 processes") == len(RUNS) - 1
    assert stdout.count("each sample's tokens split over 2 processes") == 1
    assert stdout.count("weights sharded over 2 processes (FSDP)") == 1
    assert stdout.count("longcat train") == len(RUNS)
    assert stdout.count("validation at step") == 2  # once per validating run, by the main process
    assert (runs["linear"] / f"checkpoint-{STEPS}" / "rng.rank1.safetensors").is_file()
    assert (runs["linear"] / "lora.safetensors").is_file()


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_the_lr_schedule_of_two_processes_is_one_process_schedule(two_processes, demo_root, schedule):
    """Stepped once per optimizer step (Accelerate's wrapper stepped it once per process)."""
    lr = json.loads((demo_root / "config.json").read_text())["learning_rate"]
    reference = get_scheduler(schedule, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr),
                              num_warmup_steps=2, num_training_steps=STEPS)
    expected = []
    for _ in range(STEPS):
        reference.optimizer.step()
        reference.step()
        expected.append(reference.get_last_lr()[0])
    assert _step_lrs(two_processes[0][schedule]) == pytest.approx(expected)


def test_sharded_weights_train_the_lora_of_whole_ones(two_processes):
    runs, stdout = two_processes
    _assert_same_lora(runs["cosine"] / "lora.safetensors", runs["fsdp"] / "lora.safetensors")
    assert "validation at step 4" in stdout
    assert list((runs["fsdp"] / "validation" / f"step_{STEPS}").glob("*.mp4"))


def test_two_processes_sharing_each_sample_train_the_lora_of_one_process(two_processes, demo_root, tmp_path):
    """Ulysses: both processes on the same batches, each with half of every sample's tokens."""
    runs, stdout = two_processes
    one = tmp_path / "one"
    _train_one_process(demo_root, one, "lr_scheduler=cosine", f"checkpoint_step_interval={STEPS}")
    _assert_same_lora(one / "lora.safetensors", runs["ulysses"] / "lora.safetensors")
    assert list((runs["ulysses"] / "validation" / f"step_{STEPS}").glob("*.mp4"))


@pytest.mark.parametrize("processes", [2, 4])
def test_ulysses_predictions_and_gradients_equal_one_process(processes):
    """The collectives on gloo: dense and block-sparse attention, with and without a condition frame
    (`ulysses_check.py`)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            str(Path(__file__).with_name("ulysses_check.py"))]
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(f"ulysses ok {processes}") == processes


def test_two_processes_train_the_lora_of_one_process_accumulating_two(two_processes, demo_root, tmp_path):
    """Each optimizer step averages the same two batches with the same noise, σ and dropout draws."""
    two = two_processes[0]["cosine"]
    one = tmp_path / "one"
    _train_one_process(demo_root, one, "lr_scheduler=cosine", "gradient_accumulation_steps=2",
                       f"checkpoint_step_interval={STEPS}")
    assert _step_lrs(one) == pytest.approx(_step_lrs(two))
    _assert_same_lora(two / "lora.safetensors", one / "lora.safetensors")

    # a 2-process checkpoint resumes on one process accumulating two: the same LoRA at the end
    resumed = tmp_path / "resumed"
    _train_one_process(demo_root, resumed, "lr_scheduler=cosine", "gradient_accumulation_steps=2",
                       f"resume_from_checkpoint={two / 'checkpoint-2'}", f"checkpoint_step_interval={STEPS}")
    _assert_same_lora(one / "lora.safetensors", resumed / "lora.safetensors")


def test_resuming_with_fewer_batches_per_step_is_refused_saying_what_fits(two_processes, demo_root, tmp_path):
    two = two_processes[0]["cosine"]
    with pytest.raises(TrainingStopped, match=r"cannot resume from .*checkpoint-2: it was trained with 2 batches per "
                                              r"optimizer step \(2 processes × gradient_accumulation_steps 1\), "
                                              r"this run takes 1 .*product with gradient_accumulation_steps is 2"):
        _train_one_process(demo_root, tmp_path / "refused", "lr_scheduler=cosine",
                           f"resume_from_checkpoint={two / 'checkpoint-2'}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_machines_on_loopback_train_and_resume_as_two_processes_do(two_processes, demo_root, tmp_path):
    """`torchrun --nnodes 2 --node_rank i` with one process per "machine" (as the README's multi-node
    command): the LoRA of the 2-process run, one writer of checkpoints, and a resume on both
    machines from the step-2 checkpoint (each rank's random state from its own file) ends identical."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    overrides = (*COMMON, *RUNS["cosine"])
    runs = [["train", "--config", str(demo_root / "config.json"), *_sets((*overrides, f"output_dir={straight}"))],
            ["train", "--config", str(demo_root / "config.json"),
             *_sets((*overrides, f"output_dir={resumed}", f"resume_from_checkpoint={straight / 'checkpoint-2'}"))]]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "PYTHONUNBUFFERED": "1"}
    port = _free_port()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1",
         "--master_addr", "127.0.0.1", "--master_port", str(port), str(Path(__file__).with_name("distributed_cli.py")),
         json.dumps(runs)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    assert outputs[0][0].count("× 2 processes") == 2 and "× 2 processes" not in outputs[1][0]
    assert sorted(p.name for p in straight.iterdir() if "checkpoint" in p.name) == ["checkpoint-2", "checkpoint-4"]
    assert (straight / "checkpoint-2" / "rng.rank1.safetensors").is_file()
    _assert_same_lora(two_processes[0]["cosine"] / "lora.safetensors", straight / "lora.safetensors")
    _assert_same_lora(straight / "lora.safetensors", resumed / "lora.safetensors")
    assert _step_lrs(resumed)[-2:] == pytest.approx(_step_lrs(straight)[-2:])
