"""The `longcat` CLI: help renders, exit codes, config check/init, no tracebacks on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from longcat_train.cli import EXIT_CONFIG_ERROR, app
from longcat_train.config import load_config
from tests.config_factory import base_datasets, base_training, write_pair

RUNNER = CliRunner()
WIDE = {"COLUMNS": "250"}


def _command_paths() -> list[list[str]]:
    root = get_command(app)
    paths: list[list[str]] = []
    for name, command in root.commands.items():  # type: ignore[attr-defined]
        paths.append([name])
        for sub in getattr(command, "commands", {}):
            paths.append([name, sub])
    return paths


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LONGCAT_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)


def test_every_command_exists() -> None:
    expected = {
        ("train",), ("validate",), ("cache",), ("config", "check"), ("config", "init"), ("data", "check"),
        ("export-lora",), ("plan",), ("bench",), ("demo",), ("serve",),
    }
    assert expected <= {tuple(p) for p in _command_paths()}


def test_top_level_help() -> None:
    result = RUNNER.invoke(app, ["--help"], env=WIDE)
    assert result.exit_code == 0
    for name in ("train", "validate", "cache", "config", "data", "export-lora", "plan", "bench", "demo", "serve"):
        assert name in result.output


@pytest.mark.parametrize("path", _command_paths(), ids=lambda p: " ".join(p))
def test_subcommand_help_renders(path: list[str]) -> None:
    result = RUNNER.invoke(app, [*path, "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_config_check_accepts_a_good_config(tmp_path: Path) -> None:
    config = write_pair(tmp_path, base_training(tmp_path), base_datasets())
    result = RUNNER.invoke(app, ["config", "check", "--config", str(config)], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "config OK" in result.output and "clips-val" in result.output


def test_bad_config_exits_2_without_traceback(tmp_path: Path) -> None:
    training = base_training(tmp_path)
    training["lerning_rate"] = 1e-4
    config = write_pair(tmp_path, training, base_datasets())
    result = RUNNER.invoke(
        app, ["train", "--config", str(config), "--set", "datasets[clips].video.num_frames=90"], env=WIDE
    )
    assert result.exit_code == EXIT_CONFIG_ERROR
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)  # a clean exit, not an escaped ConfigError
    assert "lerning_rate" in result.output and '"learning_rate"' in result.output
    assert "datasets[0].video.num_frames" in result.output and "89 or 93" in result.output


def test_broken_json_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text('{"lora_rank": 8,, }')
    result = RUNNER.invoke(app, ["config", "check", "--config", str(config)], env=WIDE)
    assert result.exit_code == EXIT_CONFIG_ERROR and "line 1, column 17" in result.output


def test_config_init_writes_examples_and_refuses_to_overwrite(tmp_path: Path) -> None:
    result = RUNNER.invoke(app, ["config", "init", "project"], env=WIDE)
    assert result.exit_code == 0, result.output
    config = tmp_path / "project" / "config.json"
    assert config.is_file() and (tmp_path / "project" / "multidatabackend.json").is_file()
    checked = RUNNER.invoke(app, ["config", "check", "--config", str(config), "--no-paths"], env=WIDE)
    assert checked.exit_code == 0, checked.output

    config.write_text("{}")
    again = RUNNER.invoke(app, ["config", "init", "project"], env=WIDE)
    assert again.exit_code == EXIT_CONFIG_ERROR and "--force" in again.output
    assert config.read_text() == "{}"
    forced = RUNNER.invoke(app, ["config", "init", "project", "--force", "--t2v"], env=WIDE)
    assert forced.exit_code == 0 and "validation_prompt" in config.read_text()


def test_plan_predicts_memory_for_the_datasets_buckets(tmp_path: Path) -> None:
    from longcat_train.demo.synthetic import write_demo

    config = write_demo(tmp_path, steps=4)
    result = RUNNER.invoke(app, ["plan", "--config", str(config), "--gpu-memory", "24"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "64x64x17" in result.output and "largest bucket that fits: 64x96x17" in result.output
    # host RAM is planned too: the process alone (Python, CUDA, data pipeline) needs more than 4 GiB
    starved = RUNNER.invoke(app, ["plan", "--config", str(config), "--gpu-memory", "24", "--host-memory", "4"],
                            env=WIDE)
    assert starved.exit_code == 0, starved.output
    assert "largest bucket that fits: none" in starved.output


def test_plan_predicts_per_gpu_memory_and_throughput_of_several_gpus(tmp_path: Path) -> None:
    from longcat_train.demo.synthetic import write_demo

    config = write_demo(tmp_path, steps=4)
    # planned for the release's architecture (no checkpoint at the path): the tiny model has two blocks
    args = ["plan", "--config", str(config), "--gpu-memory", "24", "--host-memory", "256",
            "--set", f"pretrained_model_name_or_path={tmp_path / 'release'}", "--json"]
    plans = {}
    for gpus, strategy in ((1, "ddp"), (2, "ddp"), (2, "fsdp"), (2, "ulysses")):
        result = RUNNER.invoke(app, [*args, "--gpus", str(gpus), "--strategy", strategy], env=WIDE)
        assert result.exit_code == 0, result.output
        plans[gpus, strategy] = json.loads(result.output)
    weights = {key: plan["buckets"][-1]["weights_gib"] for key, plan in plans.items()}
    assert weights[2, "ddp"] == weights[1, "ddp"] > weights[2, "fsdp"]
    assert plans[2, "fsdp"]["settings"]["shards"] == 2 and plans[2, "ddp"]["settings"]["shards"] == 1
    speed = {key: plan["throughput"] for key, plan in plans.items()}
    assert speed[2, "ddp"]["compute_s"] == speed[1, "ddp"]["compute_s"] > 0  # each GPU its own batch
    assert speed[2, "ddp"]["step_s"] == pytest.approx(speed[2, "ddp"]["compute_s"] + speed[2, "ddp"]["communication_s"])
    assert speed[2, "ddp"]["samples_per_s"] > speed[1, "ddp"]["samples_per_s"]
    # Ulysses: both GPUs on one clip, half of its work each
    assert speed[2, "ulysses"]["compute_s"] == pytest.approx(speed[1, "ddp"]["compute_s"] / 2)
    assert speed[2, "ulysses"]["samples_per_s"] == pytest.approx(1 / speed[2, "ulysses"]["step_s"])
    assert plans[2, "ulysses"]["buckets"][-1]["activations_gib"] < plans[1, "ddp"]["buckets"][-1]["activations_gib"]
    assert speed[2, "fsdp"]["communication_s"] > speed[2, "ddp"]["communication_s"] > speed[1, "ddp"]["communication_s"] == 0
    text = RUNNER.invoke(app, args[:-1] + ["--gpus", "2", "--strategy", "fsdp"], env=WIDE)
    assert "weights sharded over 2 GPUs" in text.output and "clips/s" in text.output
    bad = RUNNER.invoke(app, [*args, "--strategy", "zero3"], env=WIDE)
    assert bad.exit_code == EXIT_CONFIG_ERROR and "distributed_strategy" in bad.output and "fsdp" in bad.output


def test_validate_options_go_through_config_rules(tmp_path: Path) -> None:
    config = write_pair(tmp_path, base_training(tmp_path), base_datasets())
    result = RUNNER.invoke(
        app, ["validate", "--config", str(config), "--frames", "90", "--lora", "missing.safetensors:0.8"], env=WIDE
    )
    assert result.exit_code == EXIT_CONFIG_ERROR
    assert "--frames" in result.output and "89 or 93" in result.output
    assert "--lora" in result.output and "does not exist" in result.output


def test_validate_refuses_a_lora_that_is_not_safetensors_before_loading_the_model(tmp_path: Path) -> None:
    from longcat_train.demo.synthetic import write_demo

    config = write_demo(tmp_path, steps=4)
    pickled = tmp_path / "lora.pt"
    pickled.write_bytes(b"\x80\x04\x95 a pickle, not safetensors")
    result = RUNNER.invoke(app, ["validate", "--config", str(config), "--lora", f"{pickled}:0.8"], env=WIDE)
    assert result.exit_code == EXIT_CONFIG_ERROR, result.output
    assert "--lora" in result.output and "not a readable LoRA file" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "output" / "validation").exists()


def test_a_model_folder_with_only_pickled_weights_is_refused_by_name(tmp_path: Path) -> None:
    from longcat_train.demo.synthetic import write_demo

    config = write_demo(tmp_path, steps=4)
    vae = next(tmp_path.rglob("vae/config.json")).parent
    for weights in vae.glob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    result = RUNNER.invoke(app, ["config", "check", "--config", str(config)], env=WIDE)
    assert result.exit_code == EXIT_CONFIG_ERROR, result.output
    assert "vae/ holds weights only as pickle files" in result.output and ".bin" in result.output


def test_commands_without_config(tmp_path: Path) -> None:
    import torch

    from longcat_train.lora import LoraWeights, read_lora, write_lora
    from longcat_train.lora.formats import LoraModule

    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"")
    unreadable = RUNNER.invoke(app, ["export-lora", str(broken), "out.safetensors", "--format", "official"], env=WIDE)
    assert unreadable.exit_code == EXIT_CONFIG_ERROR and "SOURCE" in unreadable.output

    lora = tmp_path / "in.safetensors"
    weights = LoraWeights({"blocks.0.attn.qkv": LoraModule(torch.randn(4, 8), torch.randn(24, 4), 4.0)})
    write_lora(lora, weights, "comfyui", {"rank": 4})
    target = tmp_path / "out.safetensors"
    exported = RUNNER.invoke(app, ["export-lora", str(lora), str(target), "--format", "official"], env=WIDE)
    assert exported.exit_code == 0, exported.output
    back = read_lora(target)
    assert back.format == "official"
    assert torch.equal(back.weights.modules["blocks.0.attn.qkv"].up, weights.modules["blocks.0.attn.qkv"].up)
    bad_format = RUNNER.invoke(app, ["export-lora", str(lora), "out.safetensors", "--format", "kohya"], env=WIDE)
    assert bad_format.exit_code == EXIT_CONFIG_ERROR
    bench = RUNNER.invoke(app, ["bench", "--resolution", "480x830", "--frames", "92"], env=WIDE)
    assert bench.exit_code == EXIT_CONFIG_ERROR and "816 or 832" in bench.output and "89 or 93" in bench.output
    kept = RUNNER.invoke(app, ["bench", "--keep-projections", "qkv,ffn_w2"], env=WIDE)
    assert kept.exit_code == EXIT_CONFIG_ERROR and "ffn_w2" in kept.output and "attention_out" in kept.output
    rows = RUNNER.invoke(app, ["bench", "--mode", "memory", "--rows", "bf16,swap7"], env=WIDE)
    assert rows.exit_code == EXIT_CONFIG_ERROR and "swap7" in rows.output and "group-offload" in rows.output
    official = RUNNER.invoke(app, ["bench", "--mode", "render", "--official", str(tmp_path), "--skip", "bench"], env=WIDE)
    assert official.exit_code == EXIT_CONFIG_ERROR and "--official" in official.output
    assert "not a LongCat-Video checkout" in official.output and "'quality'" not in official.output
    assert "use distilled, fp8, quality, refine" in " ".join(official.output.split())  # render's phases, not e2e's
    if not torch.cuda.is_available():
        for mode in ("train", "memory", "bsa", "render"):
            no_gpu = RUNNER.invoke(app, ["bench", "--mode", mode], env=WIDE)
            assert no_gpu.exit_code == 1 and "CUDA GPU" in no_gpu.output, mode


def test_bench_bsa_times_the_release_sizes_unless_given_one() -> None:
    from longcat_train.bench_bsa import BsaBenchSettings

    default = BsaBenchSettings.for_bench()
    assert default.cases == (("720x1280x93", (24, 45, 80)), ("480x832x93", (24, 30, 52))) and default.iters == 10
    one = BsaBenchSettings.for_bench("480x832", 61, 5)
    assert one.cases == (("480x832x61", (16, 30, 52)),) and one.iters == 5
    assert BsaBenchSettings.for_bench(quick=True).iters == 3


def test_set_value_is_json_when_it_parses(tmp_path: Path) -> None:
    config = write_pair(tmp_path, base_training(tmp_path), base_datasets())
    as_list = RUNNER.invoke(
        app, ["config", "check", "--config", str(config), "--set", 'lora_target_modules=["attn.qkv"]'], env=WIDE
    )
    assert as_list.exit_code == 0, as_list.output
    # Not JSON, so taken as the string "attn.qkv": a string is not a list.
    as_text = RUNNER.invoke(
        app, ["config", "check", "--config", str(config), "--set", "lora_target_modules=attn.qkv"], env=WIDE
    )
    assert as_text.exit_code == EXIT_CONFIG_ERROR and "lora_target_modules" in as_text.output


def test_the_demo_project_works_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from longcat_train.demo.synthetic import write_demo

    monkeypatch.chdir(tmp_path)
    config = write_demo(Path("demo_run"), steps=2)  # as `longcat demo` writes it, relative to the shell
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = load_config(tmp_path / config)
    assert loaded.model_dir == tmp_path / "demo_run" / "model"
    assert json.loads((tmp_path / config).read_text())["pretrained_model_name_or_path"] == "model"


def test_buckets_read_the_same_in_data_check_and_plan(tmp_path: Path) -> None:
    from longcat_train.demo.synthetic import write_demo

    config = write_demo(tmp_path, steps=4)
    checked = RUNNER.invoke(app, ["data", "check", "--config", str(config)], env=WIDE)
    planned = RUNNER.invoke(app, ["plan", "--config", str(config), "--gpu-memory", "80", "--host-memory", "64"], env=WIDE)
    for result in (checked, planned):
        assert result.exit_code == 0, result.output
        assert "64x96x17" in result.output and "HxWxF" in result.output  # height x width x frames, named
        assert "@17" not in result.output and "96x64" not in result.output
