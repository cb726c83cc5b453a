"""Checkpoints that survive a kill at any moment and resume exactly.

A checkpoint is a directory `checkpoint-<step>/` holding the LoRA (ComfyUI format and any other
configured formats), `training_state.safetensors` (optimizer tensors, every RNG state) and
`training_state.json` (step, epoch, sampler position, optimizer hyper-parameters, LR scheduler,
resolved config). It is written under a temporary name and renamed in one step, so a kill during a
save leaves the previous checkpoint untouched and never a half-written one under a real name.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..file_modes import give_umask_mode
from ..lora import LoraWeights, read_lora, write_lora

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
LORA_FILE = "lora.safetensors"
STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"
CHECKSUMS = "checksums.json"  # sha256 of every other file, written last
# config keys a checkpoint's tensors depend on: a resume with other values cannot load them
SHAPE_KEYS = ("lora_rank", "lora_target_modules")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message says why and the ways out."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    sampler: dict[str, Any] = field(default_factory=dict)  # `BucketBatchSampler.state_dict()`
    nan_skipped: int = 0
    loss_ema: float | None = None  # the progress line's loss EMA, continued on resume (None: none yet)

    @classmethod
    def from_saved(cls, values: dict[str, Any]) -> TrainState:
        """From `training_state.json`'s "state"; checkpoints written before the sampler kept its own
        position saved it as `epoch` / `batches_in_epoch`."""
        values = dict(values)
        if "batches_in_epoch" in values:
            values["sampler"] = {"epoch": values.pop("epoch"), "position": values.pop("batches_in_epoch")}
        return cls(**values)


def _rng_tensors(generator: torch.Generator) -> dict[str, torch.Tensor]:
    tensors = {"rng.torch_cpu": torch.get_rng_state(), "rng.trainer": generator.get_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    np_state = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
    return tensors


def rank_rng_path(output_dir: Path, step: int, rank: int) -> Path:
    return Path(output_dir) / f".rng-step{step}-rank{rank}.safetensors"


def save_rank_rng(output_dir: Path, step: int, rank: int, generator: torch.Generator) -> Path:
    """Each non-main rank's RNG states (its noise and σ differ from rank 0's), written before the
    main process assembles the checkpoint and moved into it."""
    path = rank_rng_path(output_dir, step, rank)
    save_file(_rng_tensors(generator), str(path))
    give_umask_mode(path)
    return path


def _restore_rng(tensors: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    torch.set_rng_state(tensors["rng.torch_cpu"])
    generator.set_state(tensors["rng.trainer"])
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save_checkpoint(
    output_dir: Path,
    state: TrainState,
    lora: LoraWeights,
    lora_metadata: dict,
    export_formats: list[str],
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    generator: torch.Generator,
    resolved_config: dict,
    other_ranks: int = 0,
) -> Path:
    """Called on the main process after every rank `r ≥ 1` of `other_ranks` saved `save_rank_rng`."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{state.step}"
    tmp = output_dir / f".checkpoint-{state.step}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write_lora(tmp / LORA_FILE, lora, "comfyui", lora_metadata)
    for fmt in export_formats:
        if fmt != "comfyui":
            write_lora(tmp / f"lora.{fmt}.safetensors", lora, fmt, lora_metadata)
    for rank in range(1, other_ranks + 1):
        rank_rng_path(output_dir, state.step, rank).replace(tmp / f"rng.rank{rank}.safetensors")
    opt_tensors, opt_json = _optimizer_tensors(optimizer)
    save_file({**opt_tensors, **_rng_tensors(generator)}, str(tmp / STATE_TENSORS))
    give_umask_mode(tmp / STATE_TENSORS)
    np_state = np.random.get_state()
    (tmp / STATE_JSON).write_text(json.dumps({
        "state": asdict(state),
        "optimizer": opt_json,
        "lr_scheduler": lr_scheduler.state_dict(),
        "python_random": random.getstate()[1],
        "numpy_random": {"pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "config": resolved_config,
    }, indent=1, default=str))
    (tmp / CHECKSUMS).write_text(json.dumps({p.name: _sha256(p) for p in sorted(tmp.iterdir())}, indent=1))
    for path in tmp.iterdir():  # make the bytes durable before the rename publishes them
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():  # a re-save of the same step (e.g. the end of a resumed run)
        old = output_dir / f".checkpoint-{state.step}.old-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    return final


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be trusted (a file missing, truncated or changed since
    it was saved), or None. Checkpoints written before checksums existed get their headers read."""
    path = Path(path)
    if not (path / CHECKSUMS).is_file():
        for name in (STATE_JSON, STATE_TENSORS, LORA_FILE):
            if not (path / name).is_file():
                return f"{name} is missing"
        try:
            json.loads((path / STATE_JSON).read_text())
            for name in (STATE_TENSORS, LORA_FILE):
                with safe_open(str(path / name), framework="pt"):
                    pass
        except Exception as error:  # noqa: BLE001 - any unreadable file makes the checkpoint unusable
            return f"unreadable ({type(error).__name__}: {error})"
        return None
    try:
        expected = json.loads((path / CHECKSUMS).read_text())
    except (OSError, json.JSONDecodeError) as error:
        return f"{CHECKSUMS} is unreadable ({error})"
    for name, digest in expected.items():
        if not (path / name).is_file():
            return f"{name} is missing"
        if _sha256(path / name) != digest:
            return f"{name} does not match the checksum written when it was saved (truncated or changed)"
    return None


def config_mismatches(path: Path, config: dict) -> list[str]:
    """The shape-defining keys whose value in `config` differs from the run that saved `path`."""
    saved = json.loads((Path(path) / STATE_JSON).read_text()).get("config", {})
    return [f"{key}={json.dumps(saved[key])} in the checkpoint, {json.dumps(config[key])} in this config"
            for key in SHAPE_KEYS if key in saved and saved[key] != config.get(key)]


def list_checkpoints(output_dir: Path) -> list[Path]:
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        match = CHECKPOINT_RE.match(path.name)
        if match and (path / STATE_JSON).is_file():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def prune_checkpoints(output_dir: Path, keep: int | None) -> list[Path]:
    if not keep:
        return []
    removed = list_checkpoints(output_dir)[:-keep]
    for path in removed:
        # renamed first (atomic): a kill mid-delete leaves a leftover `remove_leftovers` clears, never
        # a half-deleted checkpoint under its real name
        doomed = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(doomed)
        shutil.rmtree(doomed)
    return removed


def remove_leftovers(output_dir: Path) -> list[Path]:
    """Delete what killed saves and prunes left in `output_dir` (`.checkpoint-N.tmp-PID`,
    `.checkpoint-N.old-PID`). Only safe while holding the directory's run lock: then no live
    process is writing them."""
    leftovers = sorted(p for p in Path(output_dir).glob(".checkpoint-*") if p.is_dir()
                       and re.match(r"^\.checkpoint-\d+\.(tmp|old)-\d+$", p.name))
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return leftovers


def check_room(output_dir: Path, checkpoint_bytes: int) -> None:
    """Before the first step: `output_dir` takes files and has room for two checkpoints (a save
    writes the new one before the old one is pruned), or `CheckpointError` saying which."""
    output_dir = Path(output_dir)
    try:
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"longcat")
        probe.unlink()
    except OSError as error:
        raise CheckpointError(f"cannot write checkpoints into {output_dir} ({error.strerror}); "
                              "give output_dir a writable folder") from None
    free = shutil.disk_usage(output_dir).free
    if free < 2 * checkpoint_bytes:
        raise CheckpointError(f"{output_dir} has {free / 2**30:.2f} GiB free; a checkpoint takes about "
                              f"{checkpoint_bytes / 2**30:.2f} GiB and a save needs room for two. Free space, "
                              "lower checkpoints_total_limit, or move output_dir")


def resolve_resume(output_dir: Path, resume: str | None, warn: Callable[[str], None] = lambda _: None) -> Path | None:
    """`latest` → the newest checkpoint in output_dir that verifies (None when there is none yet);
    each damaged one passed over goes to `warn`. A named checkpoint that is damaged raises
    `CheckpointError`."""
    if not resume:
        return None
    if resume == "latest":
        for path in reversed(list_checkpoints(output_dir)):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            warn(f"{path} is damaged ({problem}); resuming from the checkpoint before it")
        return None
    path = Path(resume)
    if not (path / STATE_JSON).is_file():
        raise FileNotFoundError(f"resume_from_checkpoint={resume}: {path / STATE_JSON} not found; "
                                "point it at a checkpoint-<step> directory or use \"latest\"")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"{path} is damaged: {problem}. Use resume_from_checkpoint=\"latest\" (the newest "
                              "checkpoint that verifies) or name an earlier checkpoint-<step>")
    return path


def load_checkpoint(path: Path, optimizer: torch.optim.Optimizer, lr_scheduler, generator: torch.Generator,
                    rank: int = 0):
    """Restore optimizer, scheduler and this rank's RNGs; returns (TrainState, LoraWeights)."""
    path = Path(path)
    meta = json.loads((path / STATE_JSON).read_text())
    tensors = load_file(str(path / STATE_TENSORS))
    opt_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            opt_state.setdefault(int(index), {})[name] = value
    for index, scalars in meta["optimizer"]["scalars"].items():
        opt_state.setdefault(int(index), {}).update(scalars)
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["optimizer"]["param_groups"]})
    lr_scheduler.load_state_dict(meta["lr_scheduler"])
    rank_file = path / f"rng.rank{rank}.safetensors"
    _restore_rng(load_file(str(rank_file)) if rank and rank_file.is_file() else tensors, generator)
    random.setstate((3, tuple(meta["python_random"]), None))
    np_meta = meta["numpy_random"]
    np.random.set_state(("MT19937", tensors["rng.numpy"].numpy().astype(np.uint32), np_meta["pos"],
                         np_meta["has_gauss"], np_meta["cached_gaussian"]))
    return TrainState.from_saved(meta["state"]), read_lora(path / LORA_FILE).weights
