"""Names stay names: ids never become paths outside output_dir, an empty path is refused, and
links that lead outside a dataset folder are skipped and reported unless explicitly allowed."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from longcat_train.cli import EXIT_CONFIG_ERROR, app
from longcat_train.data import DataSpec, scan_dataset
from longcat_train.demo.synthetic import write_demo

from .media_factory import write_clip


@pytest.fixture(scope="module")
def demo_config(tmp_path_factory) -> Path:
    return write_demo(tmp_path_factory.mktemp("names"), steps=4)


@pytest.mark.parametrize(("override", "key"), [
    ("datasets[clips].id=../../escaped", "id"),
    ("datasets[clips].id=/tmp/absolute", "id"),
    ("datasets[clips].id=..", "id"),
    ("output_dir=", "output_dir"),
    ("datasets[clips].instance_data_dir= ", "instance_data_dir"),
])
def test_a_path_where_a_name_belongs_exits_2_naming_the_key(demo_config: Path, override: str, key: str) -> None:
    result = CliRunner().invoke(app, ["config", "check", "--config", str(demo_config), "--set", override],
                                env={"COLUMNS": "250"})
    assert result.exit_code == EXIT_CONFIG_ERROR, result.output
    assert key in result.output and "Traceback" not in result.output


def _spec(directory: Path, **kwargs) -> DataSpec:
    return DataSpec(id="clips", instance_data_dir=directory, resolution=32, alignment=16, num_frames=9, **kwargs)


@pytest.fixture()
def linked_dataset(tmp_path: Path) -> Path:
    root, elsewhere = tmp_path / "clips", tmp_path / "elsewhere"
    write_clip(root / "a.mp4", count=20, fps=15)
    (root / "a.txt").write_text("a clip")
    write_clip(root / "b.mp4", count=20, fps=15)
    secret = tmp_path / "secret.txt"
    secret.write_text("a system file's contents")
    (root / "b.txt").symlink_to(secret)  # a caption that is a link out of the dataset
    write_clip(elsewhere / "c.mp4", count=20, fps=15)
    (elsewhere / "c.txt").write_text("a clip elsewhere")
    (root / "more").symlink_to(elsewhere, target_is_directory=True)  # a folder link out
    (root / "d.mp4").symlink_to(elsewhere / "c.mp4")  # a file link out
    (root / "inside").mkdir()
    write_clip(root / "inside" / "e.mp4", count=20, fps=15)
    (root / "inside" / "e.txt").write_text("a clip inside")
    (root / "alias").symlink_to(root / "inside", target_is_directory=True)  # a link that stays inside
    (root / "inside" / "loop").symlink_to(root, target_is_directory=True)  # a loop
    return root


def test_links_outside_the_dataset_folder_are_skipped_and_reported(linked_dataset: Path) -> None:
    scan = scan_dataset(_spec(linked_dataset))
    assert sorted(item.path.name for item in scan.items) == ["a.mp4", "e.mp4"]
    assert "a system file" not in " ".join(item.caption for item in scan.items)
    reasons = {skipped.path.name: skipped.reason for skipped in scan.skipped}
    assert set(reasons) == {"b.mp4", "more", "d.mp4"}
    assert all("outside the dataset folder" in r and "allow_links_outside" in r for r in reasons.values())


def test_allow_links_outside_uses_them(linked_dataset: Path) -> None:
    scan = scan_dataset(_spec(linked_dataset, allow_links_outside=True))
    assert sorted(item.path.name for item in scan.items) == ["a.mp4", "b.mp4", "c.mp4", "d.mp4", "e.mp4"]
    assert not scan.skipped
