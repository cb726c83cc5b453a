"""Loading: commented JSON, overrides, aliases, path resolution, the guides' and our examples,
the generated reference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from longcat_train.config import ConfigError, TrainingConfig, load_config
from longcat_train.config.jsonc import JsoncSyntaxError, loads_jsonc
from longcat_train.config.reference_doc import default_output, render_reference
from tests.config_factory import base_datasets, base_training, write_checkpoint, write_pair

REPO = Path(__file__).resolve().parents[1]
GUIDES = REPO / "tests" / "data" / "guide_examples"
PACKAGED = REPO / "longcat_train" / "examples"  # the example configs `longcat config init` writes


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LONGCAT_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)


def test_jsonc_comments_trailing_commas_and_strings() -> None:
    text = '{\n "a": "x // not a comment", /* block\n comment */ "b": [1, 2,], // end\n "c": "q\\"/*",\n}'
    assert loads_jsonc(text) == {"a": "x // not a comment", "b": [1, 2], "c": 'q"/*'}


def test_jsonc_error_position_counts_comment_lines() -> None:
    with pytest.raises(JsoncSyntaxError) as caught:
        loads_jsonc('/* one\ntwo */\n{"a": 1 "b": 2}')
    assert (caught.value.line, caught.value.column) == (3, 9)


def test_overrides_reach_training_and_datasets(tmp_path: Path) -> None:
    config = write_pair(tmp_path, base_training(tmp_path), base_datasets())
    loaded = load_config(
        config,
        [
            "learning_rate=2e-4",
            "validation_prompt=a cat on a fence",
            "datasets[clips].video.num_frames=33",
            "datasets[2].i2v_probability=0.5",
        ],
    )
    assert loaded.training.learning_rate == 2e-4
    assert loaded.training.validation_prompt == "a cat on a fence"
    assert loaded.dataset("clips").num_frames == 33
    assert loaded.dataset("clips-val").i2v_probability == 0.5


def test_bad_override_is_a_problem(tmp_path: Path) -> None:
    config = write_pair(tmp_path, base_training(tmp_path), base_datasets())
    with pytest.raises(ConfigError) as caught:
        load_config(config, ["learning_rate", "datasets[nope].repeats=1", "validation_num_video_frames=90"])
    keys = {p.key for p in caught.value.errors}
    assert {"learning_rate", "datasets[nope].repeats", "validation_num_video_frames"} <= keys


def test_simpletuner_aliases(tmp_path: Path) -> None:
    training = {**base_training(tmp_path), "validation_steps": 50, "checkpointing_steps": 20,
                "attention_mechanism": "diffusers"}
    loaded = load_config(write_pair(tmp_path, training, base_datasets()))
    assert loaded.training.validation_step_interval == 50
    assert loaded.training.checkpoint_step_interval == 20
    assert loaded.training.attention_implementation == "sdpa"  # SimpleTuner's "diffusers" is PyTorch SDPA


def test_is_i2v_under_video_and_i2v_probability_default(tmp_path: Path) -> None:
    datasets = base_datasets()
    del datasets[0]["is_i2v"]
    datasets[0]["video"]["is_i2v"] = True
    datasets[2]["is_i2v"] = False
    datasets[2].pop("conditioning_data")
    loaded = load_config(write_pair(tmp_path, base_training(tmp_path), datasets))
    assert loaded.dataset("clips").is_i2v and loaded.dataset("clips").i2v_probability == 1.0
    assert not loaded.dataset("clips-val").is_i2v and loaded.dataset("clips-val").i2v_probability == 0.0


def test_paths_resolve_against_their_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "project"
    root.mkdir()
    config = write_pair(root, base_training(root), base_datasets())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = load_config(config, ["pretrained_model_name_or_path=../project/ckpt"])
    assert loaded.training.output_dir == root / "out"
    assert loaded.backend_path == root / "multidatabackend.json"
    assert loaded.dataset("clips").instance_data_dir == root / "data" / "clips"
    assert loaded.dataset("clips").cache_dir_vae == root / "out" / "cache" / "vae" / "clips"
    assert loaded.model_dir == root / "ckpt"  # a --set path starts at the current directory


def test_continuation_video_resolves_against_the_config_and_is_checked_at_load(tmp_path: Path) -> None:
    from tests.media_factory import write_clip

    root = tmp_path / "project"
    root.mkdir()
    write_clip(root / "clips" / "tail.mp4", count=14, fps=30)  # 7 frames at the render's 15 fps
    training = {**base_training(root), "validation_continuation_video": "clips/tail.mp4",
                "validation_prompt": "it drives on", "validation_continuation_cond_frames": 5}
    config = write_pair(root, training, base_datasets())
    assert load_config(config).training.validation_continuation_video == root / "clips" / "tail.mp4"
    nine = "validation_continuation_cond_frames=9"
    with pytest.raises(ConfigError) as error:
        load_config(config, [nine, "validation_prompt=null"])
    rules = [p.rule for p in error.value.problems if p.key == "validation_continuation_video"]
    assert any("has 7 frames at 15 fps" in rule for rule in rules) and any("validation_prompt" in rule for rule in rules)
    assert load_config(config, [nine], check_files=False).training.validation_continuation_cond_frames == 9


def test_simpletuner_style_cwd_relative_backend(tmp_path: Path) -> None:
    # SimpleTuner configs say "config/multidatabackend.json", relative to where it runs.
    (tmp_path / "config").mkdir()
    training = base_training(tmp_path)
    training["data_backend_config"] = "config/multidatabackend.json"
    write_pair(tmp_path / "config", training, base_datasets())
    loaded = load_config("config/config.json", check_files=False)
    assert loaded.backend_path == tmp_path / "config" / "multidatabackend.json"


def test_null_checkpoint_resolves_to_longcat_home(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "home" / "models" / "LongCat-Video")
    training = base_training(tmp_path)
    training["pretrained_model_name_or_path"] = None
    loaded = load_config(write_pair(tmp_path, training, base_datasets()))
    assert loaded.model_dir == tmp_path / "home" / "models" / "LongCat-Video"


def test_text_embeds_and_disabled_entries(tmp_path: Path) -> None:
    datasets = base_datasets()
    datasets.append({"id": "te", "type": "local", "dataset_type": "text_embeds", "default": True, "cache_dir": "te"})
    datasets.append({"id": "old", "dataset_type": "video", "instance_data_dir": "gone", "disabled": True})
    loaded = load_config(write_pair(tmp_path, base_training(tmp_path), datasets))
    assert loaded.text_embeds is not None and loaded.text_embeds.cache_dir == tmp_path / "te"
    assert [d.id for d in loaded.disabled_datasets] == ["old"]
    assert "old" not in [d.id for d in loaded.datasets]


def test_guide_configs_accepted_verbatim() -> None:
    # The base guide's config with the edit guide's datasets file (the only one the guides give).
    loaded = load_config(GUIDES / "longcat_video_config.json", check_files=False)
    assert loaded.training.validation_size == (480, 832)
    assert loaded.dataset("longcat-video-train").conditioning_data == ["longcat-video-cond"]
    assert loaded.dataset("longcat-video-train").is_i2v
    # 480 with the default alignment 64 is rounded: reported, not refused.
    assert {p.key for p in loaded.warnings} == {"datasets[0].resolution", "datasets[1].resolution"}


def test_edit_guide_config_needs_the_validation_split_it_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(GUIDES / "longcat_video_edit_config.json", check_files=False)
    assert [p.key for p in caught.value.errors] == ["eval_dataset_id"]
    # With the split the guide tells you to add, beside its entries verbatim, it is accepted.
    shutil.copy(GUIDES / "longcat_video_edit_config.json", tmp_path / "config.json")
    entries = loads_jsonc((GUIDES / "multidatabackend.json").read_text())
    val = dict(entries[0], id="longcat-video-val", instance_data_dir="/data/val-clips", cache_dir_vae="/cache/val")
    (tmp_path / "multidatabackend.json").write_text(json.dumps([*entries, val]))
    loaded = load_config(tmp_path / "config.json", check_files=False)
    assert loaded.eval_dataset is not None and loaded.eval_dataset.id == "longcat-video-val"
    assert [d.id for d in loaded.training_datasets] == ["longcat-video-train"]


@pytest.mark.parametrize(
    ("config_name", "backend_name"),
    [
        ("config.json.example", "multidatabackend.json.example"),
        ("config.t2v.json.example", "multidatabackend.t2v.json.example"),
        ("tiers/80gb.json", "multidatabackend.json.example"),
        ("tiers/48gb.json", "multidatabackend.json.example"),
        ("tiers/24gb.json", "multidatabackend.json.example"),
    ],
)
def test_examples_accepted_with_real_folders(tmp_path: Path, config_name: str, backend_name: str) -> None:
    # the examples are the package's (`longcat config init` writes them); the tiers live in configs/tiers/
    config = REPO / "configs" / config_name if config_name.startswith("tiers/") else PACKAGED / config_name
    shutil.copy(config, tmp_path / "config.json")
    shutil.copy(PACKAGED / backend_name, tmp_path / "multidatabackend.json")
    for folder in ("data/clips", "data/start_frames", "data/val/clips", "data/val/start_frames"):
        (tmp_path / folder).mkdir(parents=True)
    write_checkpoint(tmp_path / "home" / "models" / "LongCat-Video")
    loaded = load_config(tmp_path / "config.json")
    assert loaded.warnings == []
    assert [d.id for d in loaded.training_datasets] == ["clips"]


def test_config_init_writes_every_packaged_example(tmp_path: Path) -> None:
    """The README's way to get the examples: `longcat config init DIR [--t2v]` writes the package's copies."""
    from typer.testing import CliRunner

    from longcat_train.cli import app

    written = {}
    for kind, args in (("i2v", []), ("t2v", ["--t2v"])):
        result = CliRunner().invoke(app, ["config", "init", str(tmp_path / kind), *args])
        assert result.exit_code == 0, result.output
        written[kind] = {p.name: p.read_bytes() for p in (tmp_path / kind).iterdir()}
    expected = {
        "i2v": {"config.json": "config.json.example", "multidatabackend.json": "multidatabackend.json.example"},
        "t2v": {"config.json": "config.t2v.json.example", "multidatabackend.json": "multidatabackend.t2v.json.example"},
    }
    assert {kind: {name: (PACKAGED / source).read_bytes() for name, source in files.items()}
            for kind, files in expected.items()} == written
    assert sorted(p.name for p in PACKAGED.glob("*.example")) == sorted(
        source for files in expected.values() for source in files.values())


def test_reference_doc_is_current() -> None:
    assert default_output().read_text(encoding="utf-8") == render_reference(), (
        "docs/config.md is stale: run `python -m longcat_train.config.reference_doc`"
    )


def test_reference_doc_lists_every_key() -> None:
    text = render_reference()
    for key in TrainingConfig.model_fields:
        assert f"| `{key}`" in text
    assert "umT5-XXL" in text and "15 fps" in text
