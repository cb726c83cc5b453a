"""What validation renders: orientation against the clips, the prompt file (text or SimpleTuner
library), the startup table's size words and SimpleTuner's defaults in `config check`."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from longcat_train.cli import _orientation_warnings, app
from longcat_train.config import ConfigError, load_config
from longcat_train.config.orientation import describe_size, follow_orientation, orientation_warning
from longcat_train.data.buckets import Bucket, Placement
from longcat_train.data.items import ClipItem, FileStamp
from longcat_train.data.report import DatasetReport
from longcat_train.training.loop import run_description
from longcat_train.training.prepare import validation_prompts
from longcat_train.validation.periodic import validation_cases
from tests.config_factory import base_datasets, base_training, write_checkpoint, write_pair

GUIDES = Path(__file__).resolve().parent / "data" / "guide_examples"
LIBRARY = Path(__file__).resolve().parent / "data" / "simpletuner" / "user_prompt_library.json.example"


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LONGCAT_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)


def _item(height: int, width: int, name: str = "a") -> ClipItem:
    bucket = Bucket(height, width, 5)
    return ClipItem(
        dataset_id="val", source=FileStamp(Path(f"/data/{name}.mp4"), 1, 1, ""), caption=f"clip {name}", bucket=bucket,
        frame_indices=tuple(range(5)), fps=15.0, window_index=0, source_size=(height, width),
        placement=Placement((height, width), (0, 0, height, width)),
    )


# --- orientation ------------------------------------------------------------------------------------

def test_simpletuner_order_against_landscape_clips_names_both_readings() -> None:
    landscape = [(480, 832)] * 3 + [(832, 480)]
    warning = orientation_warning("832x480", (832, 480), landscape, "the held-out clips", None)
    assert warning is not None and warning.key == "validation_resolution" and warning.severity == "warning"
    assert "480 wide × 832 high (portrait)" in warning.rule  # our reading
    assert "832 wide × 480 high" in warning.rule and "SimpleTuner" in warning.rule  # theirs
    assert '"480x832"' in warning.fix
    assert orientation_warning("480x832", (480, 832), landscape, "the held-out clips", None) is None
    assert orientation_warning("480x480", (480, 480), landscape, "the held-out clips", None) is None
    assert orientation_warning("480x832", (480, 832), [(832, 480)], "the training buckets", None) is not None


def test_dataset_renders_follow_each_clips_orientation() -> None:
    assert follow_orientation((480, 832), (832, 480)) == (832, 480)
    assert follow_orientation((480, 832), (512, 512)) == (480, 832)
    training = SimpleNamespace(validation_size=(480, 832), validation_using_datasets=True, validation_prompt=None,
                               validation_continuation_video=None)
    cases = validation_cases(training, [_item(64, 32, "tall"), _item(32, 64, "wide")])
    assert [case.size for case in cases] == [(832, 480), (480, 832)]


def test_data_check_warns_about_the_eval_clips_orientation(tmp_path: Path) -> None:
    loaded = load_config(write_pair(tmp_path, {**base_training(tmp_path), "validation_resolution": "832x480"},
                                    base_datasets()), check_files=False)
    report = SimpleNamespace(datasets=[
        DatasetReport("clips", "video", trained=True, buckets=Counter({"832x480x93": 5})),
        DatasetReport("clips-val", "video", buckets=Counter({"480x832x93": 2})),
    ])
    [warning] = _orientation_warnings(loaded, report)
    assert "the held-out clips are landscape" in warning.rule
    report.datasets[1].buckets = Counter()  # no held-out clips: the training buckets decide (portrait, agreeing)
    assert _orientation_warnings(loaded, report) == []


def test_startup_table_names_the_axes(tmp_path: Path) -> None:
    loaded = load_config(write_pair(tmp_path, base_training(tmp_path), base_datasets()), check_files=False)
    model = SimpleNamespace(parameters=lambda: iter([torch.zeros(1)]), offload_block_inputs=False)
    data = SimpleNamespace(scans={}, items=[])
    rows = run_description(loaded.training, model, [], 8, data, 0, 10, 1, {})
    assert rows["validation"].startswith("832 wide × 480 high × 93 frames")
    assert describe_size(480, 832) == "832 wide × 480 high"


# --- prompt file ------------------------------------------------------------------------------------

def _with_prompt_file(tmp_path: Path, name: str, text: str, **training: object):
    (tmp_path / name).write_text(text, encoding="utf-8")
    config = write_pair(tmp_path, {**base_training(tmp_path), "validation_prompt_file": name, **training},
                        base_datasets())
    return load_config(config, check_files=False)


def test_text_prompt_file_with_start_images(tmp_path: Path) -> None:
    Image.fromarray(np.full((40, 70, 3), 200, np.uint8)).save(tmp_path / "start.png")
    loaded = _with_prompt_file(
        tmp_path, "prompts.txt",
        "# renders\na fox runs --i start.png\n\na boat drifts --w 832 --h 480 --d 7\n",
        validation_using_datasets=False, eval_dataset_id=None, validation_prompt="a cat",
    )
    assert [(e.prompt, e.image) for e in loaded.prompt_entries] == [
        ("a fox runs", tmp_path / "start.png"), ("a boat drifts", None)]
    [ignored] = [w for w in loaded.warnings if w.file == tmp_path / "prompts.txt"]
    assert ignored.key == "--d, --h, --w"
    assert validation_prompts(loaded) == ["a cat", "a fox runs", "a boat drifts"]
    cases = validation_cases(loaded.training, [], loaded.prompt_entries)
    assert [c.prompt for c in cases] == ["a cat", "a fox runs", "a boat drifts"]
    assert cases[1].start_pixels is not None and cases[1].start_pixels.shape == (3, 1, 480, 832)
    assert cases[2].start_pixels is None


def test_missing_start_image_is_refused_naming_the_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        _with_prompt_file(tmp_path, "prompts.txt", "first\nsecond --i nope.png\n")
    [problem] = caught.value.errors
    assert problem.file == tmp_path / "prompts.txt" and problem.key == "line 2 --i" and problem.value == "nope.png"


def test_simpletuner_prompt_library_is_read_as_the_prompt_file(tmp_path: Path) -> None:
    (tmp_path / "lib.json").write_text(LIBRARY.read_text(), encoding="utf-8")
    config = write_pair(tmp_path, {**base_training(tmp_path), "--user_prompt_library": "lib.json"}, base_datasets())
    loaded = load_config(config, check_files=False)
    assert [(e.name, e.prompt) for e in loaded.prompt_entries] == [
        ("shortname_here", "your prompt to validate on"), ("another_shortname", "another prompt to validate on")]


def test_prompt_library_entry_without_a_prompt_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        _with_prompt_file(tmp_path, "lib.json", json.dumps({"ok": {"caption": "fine"}, "bad": {"lyrics": "la"}}))
    assert [p.key for p in caught.value.errors] == ["bad"]


# --- config check: SimpleTuner's differing defaults -------------------------------------------------

def test_config_check_lists_simpletuner_defaults_left_unset() -> None:
    result = CliRunner().invoke(app, ["config", "check", "--config", str(GUIDES / "longcat_video_config.json"),
                                      "--no-paths", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["key"]: row for row in json.loads(result.stdout)["defaults_differing_from_simpletuner"]}
    assert set(rows) == {"resolution_type", "crop", "caption_dropout_probability"}  # the guide sets resolution
    assert rows["resolution_type"]["simpletuner"] == "pixel_area" and rows["resolution_type"]["here"] == "pixel"
    plain = CliRunner().invoke(app, ["config", "check", "--config", str(GUIDES / "longcat_video_config.json"),
                                     "--no-paths"])
    assert "defaults that differ from SimpleTuner" in plain.stdout and "pixel_area" in plain.stdout


def test_validate_names_a_missing_prompt_file_by_its_option(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "ckpt")
    config = write_pair(tmp_path, base_training(tmp_path), base_datasets())
    result = CliRunner().invoke(app, ["validate", "--config", str(config), "--prompt-file", "nope.txt"])
    assert result.exit_code == 2
    assert "--prompt-file" in result.output and "nope.txt" in result.output
