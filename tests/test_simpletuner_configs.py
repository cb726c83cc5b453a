"""SimpleTuner's own files (tests/data/simpletuner/, verbatim) and its conventions load: keys
mapped, machinery keys one warning each, unhonourable values refused with the alternative."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from longcat_train.config import ConfigError, TrainingConfig, load_config
from longcat_train.config import dependencies
from longcat_train.config.jsonc import DuplicateKeyError, loads_jsonc
from longcat_train.config.model_problems import _unknown_key_fix
from longcat_train.config.simpletuner import SIMPLETUNER_DATASET_KEYS, SIMPLETUNER_TRAINING_KEYS
from longcat_train.config.datasets import DatasetConfig
from longcat_train.config.model_problems import accepted_keys
from tests.config_factory import base_datasets, base_training, write_checkpoint, write_pair

DATA = Path(__file__).resolve().parent / "data" / "simpletuner"
EXAMPLE = DATA / "longcat-video.peft-lora+ramtorch.config.json"
EXAMPLE_DATASETS = DATA / "multidatabackend-small-video-480p+81f.json"
CONFIGURATOR = DATA / "configurator.config.json.example"
LOCAL_DATASET = ("datasets[0].type=local", "datasets[0].instance_data_dir=clips", "datasets[0].caption_strategy=textfile")


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LONGCAT_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)


def _example_project(root: Path) -> Path:
    """The example where SimpleTuner runs it: its data_backend_config is config/examples/<file>."""
    (root / "config" / "examples").mkdir(parents=True)
    shutil.copy(EXAMPLE_DATASETS, root / "config" / "examples")
    (root / "clips").mkdir()
    return Path(shutil.copy(EXAMPLE, root / "config.json"))


def test_longcat_example_refuses_only_the_remote_dataset(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(_example_project(tmp_path), check_files=False)
    errors = {p.key: p for p in caught.value.errors}
    assert set(errors) == {"datasets[0].type", "datasets[0].caption_strategy"}
    assert "hf download" in errors["datasets[0].type"].fix and '"type": "local"' in errors["datasets[0].type"].fix
    assert '"textfile"' in errors["datasets[0].caption_strategy"].fix


def test_longcat_example_loads_with_a_local_dataset(tmp_path: Path) -> None:
    loaded = load_config(_example_project(tmp_path), LOCAL_DATASET, check_files=False)
    training = loaded.training
    assert (training.max_train_steps, training.num_train_epochs) == (200, None)  # its epochs 0: steps decide
    assert training.validation_step_interval == 50 and training.checkpoint_step_interval == 100
    assert training.attention_implementation == "auto"  # flash-attn-3-hub: nothing downloaded here
    assert training.optimizer == "adamw" and training.lora_rank == 16
    clips = loaded.dataset("dreambooth-480-81f")
    assert clips.caption_dropout_probability == 0.1  # the top-level default, copied into the dataset
    assert clips.resolution_type == "pixel_area" and clips.num_frames == 81 and clips.crop is False
    assert clips.cache_dir_vae.parts[-2:] == ("longcat_video", "dreambooth-480-81f")  # {model_family} filled
    warned = Counter(p.key for p in loaded.warnings)
    for key in ("push_to_hub", "push_checkpoints_to_hub", "hub_model_id", "use_ema", "ramtorch",
                "ramtorch_target_modules", "ramtorch_transformer_percent", "vae_batch_size", "optimizer",
                "attention_mechanism", "datasets[0].huggingface", "datasets[0].metadata_backend"):
        assert warned[key] == 1, key
    assert all(count == 1 for count in warned.values())
    assert "lora_type" not in warned  # "standard" is what is trained: nothing to say


def test_configurator_key_style_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dependencies, "module_installed", lambda name: True)  # wandb, as SimpleTuner users have
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "multidatabackend.json").write_text(json.dumps(
        [{"id": "clips", "dataset_type": "video", "instance_data_dir": "clips"}]), encoding="utf-8")
    config = Path(shutil.copy(CONFIGURATOR, tmp_path / "config.json"))
    with pytest.raises(ConfigError) as caught:  # it is a Flux LyCORIS example
        load_config(config, check_files=False)
    assert {p.key for p in caught.value.errors} == {"model_family", "lora_type"}  # named without the dashes
    loaded = load_config(config, ("model_family=longcat_video", "lora_type=standard"), check_files=False)
    training = loaded.training
    assert training.lr_scheduler == "polynomial" and training.learning_rate == 1e-4  # "1e-4" as text
    assert training.validation_num_inference_steps == 20 and training.gradient_checkpointing is True
    assert training.validation_step_interval == 500 and training.max_train_steps == 10000
    clips = loaded.dataset("clips")
    assert (clips.resolution, clips.resolution_type, clips.caption_dropout_probability) == (1024, "pixel_area", 0.1)
    assert {"push_to_hub", "lycoris_config", "validation_torch_compile"} <= {p.key for p in loaded.warnings}


def test_key_given_as_dash_key_and_key_is_refused(tmp_path: Path) -> None:
    training = {**base_training(tmp_path), "--learning_rate": 2e-4}
    write_checkpoint(tmp_path / "ckpt")
    with pytest.raises(ConfigError) as caught:
        load_config(write_pair(tmp_path, training, base_datasets()))
    assert [p.key for p in caught.value.errors] == ["--learning_rate"]
    assert "given twice" in caught.value.errors[0].rule


def test_values_that_cannot_be_honoured_name_the_alternative(tmp_path: Path) -> None:
    training = {**base_training(tmp_path), "use_ema": True, "optimizer": "prodigy", "lora_type": "lycoris",
                "validation_prompt_library": True}
    with pytest.raises(ConfigError) as caught:
        load_config(write_pair(tmp_path, training, base_datasets()), check_files=False)
    fixes = {p.key: p.fix for p in caught.value.errors}
    assert set(fixes) == {"use_ema", "optimizer", "lora_type", "validation_prompt_library"}
    assert "'adamw'" in fixes["optimizer"] and '"standard"' in fixes["lora_type"]
    assert "validation_prompt_file" in fixes["validation_prompt_library"]


def test_zero_length_as_text_lets_the_other_length_key_decide(tmp_path: Path) -> None:
    training = {**base_training(tmp_path), "--num_train_epochs": "0", "--max_train_steps": "30"}
    del training["max_train_steps"]
    loaded = load_config(write_pair(tmp_path, training, base_datasets()), check_files=False)
    assert (loaded.training.num_train_epochs, loaded.training.max_train_steps) == (None, 30)


def test_a_renamed_key_given_under_both_names_is_refused(tmp_path: Path) -> None:
    training = {**base_training(tmp_path), "validation_steps": 10, "validation_step_interval": 20}
    with pytest.raises(ConfigError) as caught:
        load_config(write_pair(tmp_path, training, base_datasets()), check_files=False)
    assert [p.key for p in caught.value.errors] == ["validation_steps"]


@pytest.mark.parametrize("in_file", ["validation_steps", "validation_step_interval"])
@pytest.mark.parametrize("on_command_line", ["validation_steps", "validation_step_interval"])
def test_an_override_replaces_the_setting_under_either_name(tmp_path: Path, in_file: str, on_command_line: str) -> None:
    config = write_pair(tmp_path, {**base_training(tmp_path), in_file: 10}, base_datasets())
    loaded = load_config(config, (f"{on_command_line}=null",), check_files=False)
    assert loaded.training.validation_step_interval is None


def test_every_known_key_is_accepted_somewhere() -> None:
    # "same" and "renamed" rows must name keys our models accept, or the table lies.
    ours = {"config.json": set(accepted_keys(TrainingConfig)), "dataset": set(accepted_keys(DatasetConfig)) | {
        "default", "cache_dir"}}  # the text_embeds entry's keys
    for place, table in (("config.json", SIMPLETUNER_TRAINING_KEYS), ("dataset", SIMPLETUNER_DATASET_KEYS)):
        for key, entry in table.items():
            if entry.treatment in ("same", "renamed"):
                assert (entry.target or key) in ours[place], key


# --- JSON details ---------------------------------------------------------------------------------

def test_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    config = write_pair(tmp_path, base_training(tmp_path), base_datasets())
    config.write_bytes(b"\xef\xbb\xbf" + config.read_bytes())
    write_checkpoint(tmp_path / "ckpt")
    assert load_config(config).training.lora_rank == 8


def test_duplicate_key_is_refused_naming_both_lines(tmp_path: Path) -> None:
    with pytest.raises(DuplicateKeyError) as caught:
        loads_jsonc('[{"id": "a"},\n {"id": "b",\n  // "id": "c"\n  "x": {"id": 1},\n  "id": "d"}]')
    assert (caught.value.key, caught.value.first_line, caught.value.line) == ("id", 2, 5)
    config = write_pair(tmp_path, base_training(tmp_path), base_datasets())
    config.write_text(config.read_text().replace('"lora_rank": 8,', '"lora_rank": 8,\n  "lora_rank": 16,'))
    with pytest.raises(ConfigError) as error:
        load_config(config)
    problem = error.value.errors[0]
    assert problem.value == "lora_rank" and "line" in problem.key and "duplicate key" in problem.rule


@pytest.mark.parametrize("key", ["vae_batch_size_x", "push_models_to_hub", "lora_kind", "num_validation_videos"])
def test_no_suggestion_for_keys_that_are_not_typos(key: str) -> None:
    assert "did you mean" not in _unknown_key_fix(key, TrainingConfig, {})


@pytest.mark.parametrize(("typo", "meant"), [("lerning_rate", "learning_rate"), ("lora_rnak", "lora_rank"),
                                             ("seeed", "seed"), ("validation_resolutoin", "validation_resolution")])
def test_suggestion_for_typos(typo: str, meant: str) -> None:
    assert f'did you mean "{meant}"' in _unknown_key_fix(typo, TrainingConfig, {})


# --- dependency-backed values ----------------------------------------------------------------------

@pytest.mark.parametrize(("key", "value", "install"), [
    ("attention_implementation", "xformers", "pip install xformers"),
    ("attention_mechanism", "flash-attn-2", "pip install flash-attn"),
    ("report_to", "wandb", "pip install wandb"),
    ("base_model_precision", "int8-quanto", "pip install optimum-quanto"),
])
def test_missing_package_is_refused_naming_key_and_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str, value: str, install: str
) -> None:
    monkeypatch.setattr(dependencies, "module_installed", lambda name: False)
    training = {**base_training(tmp_path), key: value}
    with pytest.raises(ConfigError) as caught:
        load_config(write_pair(tmp_path, training, base_datasets()), check_files=False)
    [problem] = caught.value.errors
    assert problem.key == key and install in problem.fix and "not installed" in problem.rule


# --- learning-rate schedules -----------------------------------------------------------------------

def _learning_rates(scheduler_settings: dict, steps: int = 10) -> list[float]:
    from longcat_train.training.loop import make_lr_scheduler

    config = TrainingConfig(learning_rate=1.0, **scheduler_settings)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
    scheduler = make_lr_scheduler(config, optimizer, steps)
    rates = []
    for _ in range(steps):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates


def test_polynomial_and_cosine_with_restarts_schedules_are_used() -> None:
    squared = _learning_rates({"lr_scheduler": "polynomial", "lr_power": 2.0})
    assert squared[5] == pytest.approx(0.5**2, abs=1e-6)  # (1 - 5/10)^2 of the peak
    linear = _learning_rates({"lr_scheduler": "polynomial"})
    assert linear[5] == pytest.approx(0.5, abs=1e-6)
    restarts = _learning_rates({"lr_scheduler": "cosine_with_restarts", "lr_num_cycles": 2})
    assert restarts[0] == restarts[5] == pytest.approx(1.0)  # back at the peak half way
    assert restarts[4] < 0.2


def test_reference_lists_every_simpletuner_key_and_differing_default() -> None:
    from longcat_train.config.reference_doc import render_reference
    from longcat_train.config.simpletuner import SIMPLETUNER_DATASET_DEFAULTS

    text = render_reference()
    for key in [*SIMPLETUNER_TRAINING_KEYS, *SIMPLETUNER_DATASET_KEYS]:
        assert f"| `{key}` | " in text, key
    for key in SIMPLETUNER_DATASET_DEFAULTS:
        assert f"| `{key}` | `" in text.split("Defaults that differ from SimpleTuner's")[1], key
