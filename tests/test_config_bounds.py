"""Values without bounds are refused before any work: `config check` exits 2 naming the key
(NaN and infinities, absurd counts, a boolean where a number belongs)."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from longcat_train.cli import EXIT_CONFIG_ERROR, app
from longcat_train.demo.synthetic import write_demo

CASES = [
    ("learning_rate=NaN", "learning_rate"),
    ("learning_rate=Infinity", "learning_rate"),
    ("learning_rate=1e39", "learning_rate"),
    ("lora_alpha=-Infinity", "lora_alpha"),
    ("lora_rank=true", "lora_rank"),
    ("lora_rank=1000000000000", "lora_rank"),
    ("seed=18446744073709551616", "seed"),
    ("lr_warmup_steps=1e25", "lr_warmup_steps"),
    ("max_train_steps=10000000000", "max_train_steps"),
    ("datasets[clips].repeats=1000000000", "repeats"),
    ("datasets[clips].fps=Infinity", "fps"),
    ("datasets[clips].resolution=Infinity", "resolution"),
    ("datasets[clips].probability=Infinity", "probability"),
    ("datasets[clips].probability=0", "probability"),
    ("gradient_checkpointing=yes", "gradient_checkpointing"),  # booleans are strict: true or false
    ("datasets[clips].crop=1", "crop"),
    ("musubi_block_swap_device=cuda:9", "musubi_block_swap_device"),  # the only training dataset: no batch can be drawn
]


@pytest.fixture(scope="module")
def demo_config(tmp_path_factory) -> Path:
    return write_demo(tmp_path_factory.mktemp("bounds"), steps=4)


@pytest.mark.parametrize(("override", "key"), CASES)
def test_out_of_range_values_exit_2_naming_the_key(demo_config: Path, override: str, key: str) -> None:
    result = CliRunner().invoke(app, ["config", "check", "--config", str(demo_config), "--set", override],
                                env={"COLUMNS": "250"})
    assert result.exit_code == EXIT_CONFIG_ERROR, result.output
    assert key in result.output and "Traceback" not in result.output
