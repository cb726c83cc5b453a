"""Checkpoint files: atomic publication, pruning, and per-rank RNG for multi-process resume."""

import torch

from longcat_train.lora import LoraWeights
from longcat_train.lora.formats import LoraModule
from longcat_train.training.checkpoint import (
    TrainState,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    resolve_resume,
    save_checkpoint,
    save_rank_rng,
)


def _parts():
    param = torch.nn.Parameter(torch.randn(4, 3))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    param.grad = torch.randn_like(param)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    weights = LoraWeights({"blocks.0.attn.proj": LoraModule(torch.randn(2, 8), torch.randn(8, 2), 2.0)})
    return optimizer, scheduler, weights


def test_each_rank_resumes_its_own_random_stream(tmp_path):
    optimizer, scheduler, weights = _parts()
    main, other = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    save_rank_rng(tmp_path, 5, 1, other)
    path = save_checkpoint(tmp_path, TrainState(step=5), weights, {}, ["official"], optimizer, scheduler, main, {}, 1)
    expected_main, expected_other = torch.rand(3, generator=main), torch.rand(3, generator=other)

    for rank, expected in ((0, expected_main), (1, expected_other)):
        generator = torch.Generator().manual_seed(99)
        state, loaded = load_checkpoint(path, optimizer, scheduler, generator, rank)
        assert state.step == 5
        assert torch.equal(torch.rand(3, generator=generator), expected)
    assert torch.equal(loaded.modules["blocks.0.attn.proj"].down, weights.modules["blocks.0.attn.proj"].down)
    assert (path / "lora.official.safetensors").is_file()


def test_only_published_checkpoints_count_and_pruning_keeps_the_newest(tmp_path):
    optimizer, scheduler, weights = _parts()
    generator = torch.Generator().manual_seed(0)
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, TrainState(step=step), weights, {}, [], optimizer, scheduler, generator, {})
    (tmp_path / ".checkpoint-8.tmp-123").mkdir()  # what a kill during a save leaves behind
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert resolve_resume(tmp_path, "latest").name == "checkpoint-6"
    prune_checkpoints(tmp_path, 2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6"]


def test_a_checkpoint_from_before_the_sampler_kept_its_position_still_resumes() -> None:
    from longcat_train.training.checkpoint import TrainState

    state = TrainState.from_saved({"step": 6, "epoch": 2, "batches_in_epoch": 1, "nan_skipped": 0})
    assert state.step == 6 and state.sampler == {"epoch": 2, "position": 1}
    assert TrainState.from_saved({"step": 1, "sampler": {"epoch": 0, "position": 1}}).sampler["position"] == 1


def test_latest_passes_over_a_damaged_checkpoint_with_a_warning_and_a_named_one_is_refused(tmp_path):
    import pytest

    from longcat_train.training.checkpoint import STATE_TENSORS, CheckpointError, checkpoint_problem

    optimizer, scheduler, weights = _parts()
    generator = torch.Generator().manual_seed(0)
    for step in (2, 4):
        save_checkpoint(tmp_path, TrainState(step=step), weights, {}, [], optimizer, scheduler, generator, {})
    damaged = tmp_path / "checkpoint-4"
    data = (damaged / STATE_TENSORS).read_bytes()
    (damaged / STATE_TENSORS).write_bytes(data[: len(data) // 2])  # a disk that filled up mid-write
    assert "training_state.safetensors" in checkpoint_problem(damaged)
    warnings = []
    assert resolve_resume(tmp_path, "latest", warn=warnings.append).name == "checkpoint-2"
    assert len(warnings) == 1 and "checkpoint-4" in warnings[0]
    with pytest.raises(CheckpointError, match="checkpoint-4 is damaged.*latest"):
        resolve_resume(tmp_path, str(damaged))


def test_config_mismatches_name_the_shape_keys_that_changed(tmp_path):
    from longcat_train.training.checkpoint import config_mismatches

    optimizer, scheduler, weights = _parts()
    path = save_checkpoint(tmp_path, TrainState(step=2), weights, {}, [], optimizer, scheduler,
                           torch.Generator(), {"lora_rank": 16, "lora_target_modules": ["attn.qkv"]})
    assert config_mismatches(path, {"lora_rank": 16, "lora_target_modules": ["attn.qkv"]}) == []
    assert config_mismatches(path, {"lora_rank": 32, "lora_target_modules": ["attn.qkv"]}) == [
        "lora_rank=16 in the checkpoint, 32 in this config"]


def test_leftovers_of_killed_saves_and_prunes_are_removed_and_pruning_leaves_none(tmp_path):
    from longcat_train.training.checkpoint import remove_leftovers

    optimizer, scheduler, weights = _parts()
    generator = torch.Generator().manual_seed(0)
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, TrainState(step=step), weights, {}, [], optimizer, scheduler, generator, {})
    prune_checkpoints(tmp_path, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-6"]
    for name in (".checkpoint-8.tmp-4242", ".checkpoint-2.old-17"):
        (tmp_path / name).mkdir()
    assert [p.name for p in remove_leftovers(tmp_path)] == [".checkpoint-2.old-17", ".checkpoint-8.tmp-4242"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-6"]


def test_check_room_refuses_a_disk_without_space_for_two_checkpoints(tmp_path, monkeypatch):
    import shutil

    import pytest

    from longcat_train.training import checkpoint
    from longcat_train.training.checkpoint import CheckpointError, check_room

    check_room(tmp_path, 1024)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda _: usage._replace(free=1500))
    with pytest.raises(CheckpointError, match="room for two"):
        check_room(tmp_path, 1024)
