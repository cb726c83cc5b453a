"""What the CLI prints and how it exits where a new user first stumbles (issue 18: 2, 5, 10a-g):
piped output keeps whole values, `--json`, `data check`'s exit code and its refusal of a dataset
without captions, problems that name the option given, user text never taken for markup, and
written files that get the mode the umask allows."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from longcat_train.cli import EXIT_CONFIG_ERROR, EXIT_STOPPED, app
from longcat_train.demo.synthetic import write_demo
from tests.config_factory import base_datasets, base_training, write_pair

RUNNER = CliRunner()
# a pipe (CliRunner's output is not a terminal) where rich would take 80 columns
PIPED = {"COLUMNS": "80"}


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LONGCAT_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """The demo project (a tiny checkpoint, 6 captioned training clips, 1 held out) in a folder whose
    paths do not fit 80 columns; returns its config.json."""
    return write_demo(tmp_path / "a-project-folder-with-a-name-long-enough-that-80-columns-cut-it", steps=2)


def _clips(config: Path) -> Path:
    return config.parent / "data" / "train" / "clips"


def _invoke(*args: str):
    return RUNNER.invoke(app, list(args), env=PIPED)


@contextlib.contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_piped_tables_keep_paths_ids_and_commands_whole(project: Path) -> None:
    missing = _clips(project) / "clip_001.mp4"
    (_clips(project) / "clip_001.txt").unlink()
    checked = _invoke("data", "check", "--config", str(project))
    assert checked.exit_code == 0, checked.output
    assert str(missing) in checked.output and "caption file missing: clip_001.txt" in checked.output
    assert "start-frames-val" in checked.output and "…" not in checked.output

    summary = _invoke("config", "check", "--config", str(project))
    assert summary.exit_code == 0, summary.output
    assert str(_clips(project)) in summary.output

    # a user's [id] is not rich markup, and the fix stays on one line
    bad = _invoke("config", "check", "--config", str(project), "--set", "datasets[clipz].video.num_frames=33")
    assert bad.exit_code == EXIT_CONFIG_ERROR
    assert "datasets[clipz].video.num_frames" in bad.output
    assert "select a dataset by its position (datasets[0]) or its id (datasets[my-clips])" in bad.output

    plan = _invoke("plan", "--config", str(project), "--gpu-memory", "24")
    assert plan.exit_code == 0, plan.output
    advice = next(line for line in plan.output.splitlines() if "fastest settings predicted to fit" in line)
    assert "activation_offload=" in advice and "predicted peak" in advice


def test_bracketed_dataset_ids_survive_in_data_check(project: Path) -> None:
    result = _invoke("data", "check", "--config", str(project), "--set", "datasets[0].id=clips[hd]")
    assert result.exit_code == 0, result.output
    assert "clips[hd]: buckets" in result.output  # the title once said WxH over HxWxF labels


def test_json_documents(project: Path) -> None:
    (_clips(project) / "clip_001.txt").unlink()
    data = json.loads(_invoke("data", "check", "--config", str(project), "--json").stdout)
    assert data["ok"] and data["problems"] == [] and data["empty_training_datasets"] == []
    clips = {d["id"]: d for d in data["datasets"]}["clips"]
    assert clips["trained"] and clips["usable_files"] == 6 and clips["items"] == 6
    assert clips["captions_missing"] == 1
    assert clips["caption_warnings"] == [{"path": str(_clips(project) / "clip_001.mp4"),
                                          "reason": "caption file missing: clip_001.txt"}]
    assert clips["buckets"] == {"64x64x17": 3, "64x96x17": 3} and clips["skipped"] == []

    good = _invoke("config", "check", "--config", str(project), "--json")
    assert good.exit_code == 0 and json.loads(good.stdout)["ok"] is True
    bad = _invoke("config", "check", "--config", str(project), "--set", "datasets[clips].video.num_frames=34", "--json")
    assert bad.exit_code == EXIT_CONFIG_ERROR
    document = json.loads(bad.stdout)
    assert document["ok"] is False
    (problem,) = document["problems"]
    assert problem["key"] == "datasets[0].video.num_frames" and problem["value"] == 34
    assert "(frames - 1) % 4 == 0" in problem["rule"] and "33 or 37" in problem["fix"]

    plan = json.loads(_invoke("plan", "--config", str(project), "--gpu-memory", "24", "--json").stdout)
    assert [b["bucket"] for b in plan["buckets"]] == [[64, 64, 17], [64, 96, 17]]
    assert all(b["fits"] and b["peak_vram_gib"] > 0 for b in plan["buckets"])
    assert plan["largest_fitting_bucket"] == [64, 96, 17] and plan["gpu_memory_gib"] == 24
    assert isinstance(plan["picked"], dict) and plan["picked"]


def test_data_check_fails_on_an_empty_training_dataset_only(project: Path) -> None:
    # 34-frame sources give 17 frames at 15 fps: too short for 21
    empty = _invoke("data", "check", "--config", str(project), "--set", "datasets[clips].video.num_frames=21")
    assert empty.exit_code == EXIT_STOPPED, empty.output
    assert "no usable clips in training dataset(s) clips" in empty.output
    held_out = _invoke("data", "check", "--config", str(project), "--set", "datasets[clips-val].video.num_frames=21")
    assert held_out.exit_code == 0, held_out.output


def test_a_dataset_without_any_caption_is_refused_unless_allowed(project: Path) -> None:
    for caption in _clips(project).glob("*.txt"):
        caption.unlink()
    refused = _invoke("data", "check", "--config", str(project))
    assert refused.exit_code == EXIT_STOPPED
    assert "allow_missing_captions: true" in refused.output
    allowed = _invoke("data", "check", "--config", str(project), "--json",
                      "--set", "datasets[clips].allow_missing_captions=true")
    assert allowed.exit_code == 0, allowed.output
    clips = {d["id"]: d for d in json.loads(allowed.stdout)["datasets"]}["clips"]
    assert clips["usable_files"] == 6 and clips["captions_missing"] == 6


def test_train_counts_missing_captions_and_writes_files_the_umask_shares(project: Path) -> None:
    (_clips(project) / "clip_001.txt").unlink()
    with _umask(0o027):
        result = _invoke("train", "--config", str(project), "--set", "validation_steps=100")
    assert result.exit_code == 0, result.output
    assert "clips: 6 items, 0 skipped, 1 without caption" in result.output
    written = [*(project.parent / "cache").rglob("*.safetensors"), *(project.parent / "output").rglob("*.safetensors")]
    assert any("checkpoint-" in str(p) for p in written) and any("cache" in str(p) for p in written)
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written} == {p.name: "0o640" for p in written}


def test_exported_lora_gets_the_mode_the_umask_allows(tmp_path: Path) -> None:
    import torch

    from longcat_train.lora import LoraWeights, write_lora
    from longcat_train.lora.formats import LoraModule

    source, target = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    write_lora(source, LoraWeights({"blocks.0.attn.qkv": LoraModule(torch.randn(4, 8), torch.randn(24, 4), 4.0)}))
    for mask, mode in ((0o022, 0o644), (0o077, 0o600)):
        with _umask(mask):
            result = _invoke("export-lora", str(source), str(target), "--format", "official")
        assert result.exit_code == 0, result.output
        assert stat.S_IMODE(target.stat().st_mode) == mode


def test_missing_checkpoint_hint_names_hf_download(tmp_path: Path) -> None:
    training = base_training(tmp_path)
    training["pretrained_model_name_or_path"] = str(tmp_path / "nowhere")
    result = _invoke("config", "check", "--config", str(write_pair(tmp_path, training, base_datasets())))
    assert result.exit_code == EXIT_CONFIG_ERROR
    assert f"hf download meituan-longcat/LongCat-Video --local-dir {tmp_path / 'nowhere'}" in result.output
    assert "huggingface-cli" not in result.output


def test_flags_take_no_value_in_help_or_on_the_command_line() -> None:
    help_text = _invoke("config", "init", "--help").output
    assert [line for line in help_text.splitlines() if "--t2v" in line or "--force" in line]
    assert not [line for line in help_text.splitlines() if ("--t2v" in line or "--force" in line) and "<bool>" in line]
    assert _invoke("config", "init", "project", "--t2v").exit_code == 0
    assert "validation_prompt" in (Path("project") / "config.json").read_text()


def test_validate_problems_name_the_option_given(tmp_path: Path) -> None:
    config = write_pair(tmp_path, base_training(tmp_path), base_datasets())
    (tmp_path / "style.safetensors").write_bytes(b"")
    result = _invoke("validate", "--config", str(config), "--frames", "18", "--lora", "style.safetensors:abc")
    assert result.exit_code == EXIT_CONFIG_ERROR
    rows = [line for line in result.output.splitlines() if "│" in line]
    assert any("--frames" in row and "18" in row and "17 or 21" in row for row in rows)
    assert "validation_num_video_frames" not in result.output
    assert "bad strength 'abc'" in result.output and "does not exist" not in result.output


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_plan_without_a_gpu_answers_before_the_heavy_imports(project: Path) -> None:
    heavy = ("longcat_train.memory", "longcat_train.training.prepare", "diffusers")
    probe = ("import sys; from longcat_train.cli import app; "
             f"code = app(['plan', '--config', {str(project)!r}], standalone_mode=False); "
             f"print(code, [m for m in {heavy!r} if m in sys.modules])")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert "no CUDA GPU" in run.stdout + run.stderr, run.stderr
    assert run.stdout.strip().splitlines()[-1] == f"{EXIT_CONFIG_ERROR} []", run.stdout
