"""Hostile configs: a few hundred seeded mutations of the demo's two files. Each must end with exit 0
or exit 2 and a message, never a traceback and never a hang."""

from __future__ import annotations

import copy
import json
import random
import signal
import traceback
from pathlib import Path

import pytest
from typer.testing import CliRunner

from longcat_train.cli import EXIT_CONFIG_ERROR, app
from longcat_train.demo.synthetic import write_demo

CASES = 300
SECONDS_PER_CASE = 20  # a hang, not a slow case: config check answers in well under a second

# Values that broke or fooled the checks before (issue 19) and their neighbours.
NASTY = [
    None, True, False, 0, -1, 1, 2**63, -(2**63) - 1, 10**30, 1e308, -1e308, 0.5, -0.0, float("nan"),
    float("inf"), float("-inf"), "", " ", "NaN", "Infinity", "../../etc", "/etc/passwd", "~", ".", "..",
    "a\x00b", "\u202e\u00e9\U0001f600", "x" * 10_000, "480x832", "832x480", "0x0", "-64x64", "1e9",
    "latest", "none", "null", [], [1, "a"], {}, {"a": {"b": None}},
]


class Hang(Exception):
    pass


def _on_alarm(signum, frame):  # noqa: ARG001
    raise Hang()


def _mutate_value(rng: random.Random, value):
    choice = rng.random()
    if choice < 0.6:
        return copy.deepcopy(rng.choice(NASTY))
    if choice < 0.75 and isinstance(value, (int, float)) and not isinstance(value, bool):
        return value * rng.choice([-1, 0, 3, 1e6, 1e-6])
    if choice < 0.85 and isinstance(value, str):
        return value[: rng.randrange(len(value) + 1)] + rng.choice(["", "/..", "x", " "])
    nested = 0
    for _ in range(rng.choice([2, 50, 100_000])):
        nested = [nested]
    return nested


def _mutate_table(rng: random.Random, table: dict) -> None:
    for _ in range(rng.randint(1, 3)):
        action = rng.random()
        keys = list(table)
        if action < 0.7 and keys:
            key = rng.choice(keys)
            if isinstance(table[key], dict) and rng.random() < 0.5:
                _mutate_table(rng, table[key])
            else:
                table[key] = _mutate_value(rng, table[key])
        elif action < 0.85 and keys:
            del table[rng.choice(keys)]
        else:
            table[rng.choice(["lora_rnak", "--lora_rank", "validation_resolution", "unknown", "resolution", "id"])] = (
                _mutate_value(rng, 1))


def _mutated_text(rng: random.Random, document) -> str:
    document = copy.deepcopy(document)
    tables = [document] if isinstance(document, dict) else [d for d in document if isinstance(d, dict)]
    if tables:
        _mutate_table(rng, rng.choice(tables))
    if isinstance(document, list) and rng.random() < 0.1:
        document.append(copy.deepcopy(rng.choice(document)))  # a duplicate id
    try:
        text = json.dumps(document, allow_nan=True)
    except (RecursionError, ValueError):
        text = "[" * 100_000 + "]" * 100_000
    if rng.random() < 0.08:  # damaged text: cut, a stray byte, a BOM
        cut = rng.randrange(len(text))
        text = rng.choice([text[:cut], text[:cut] + "\x07" + text[cut:], "\ufeff" + text])
    return text


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict, list]:
    config = write_demo(tmp_path_factory.mktemp("fuzz"), steps=4)
    return config, json.loads(config.read_text()), json.loads((config.parent / "multidatabackend.json").read_text())


def test_mutated_configs_end_in_exit_0_or_a_message(demo) -> None:
    config, training, datasets = demo
    backend = config.parent / "multidatabackend.json"
    original_config, original_backend = config.read_text(), backend.read_text()
    rng = random.Random(19)
    failures: list[str] = []
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        for case in range(CASES):
            mutate_config = rng.random() < 0.6
            config.write_text(_mutated_text(rng, training) if mutate_config else original_config)
            backend.write_text(original_backend if mutate_config else _mutated_text(rng, datasets))
            signal.alarm(SECONDS_PER_CASE)
            try:
                result = CliRunner().invoke(app, ["config", "check", "--config", str(config)], env={"COLUMNS": "200"})
            except Hang:
                failures.append(f"case {case}: no answer in {SECONDS_PER_CASE} s")
                continue
            finally:
                signal.alarm(0)
            crashed = result.exception is not None and not isinstance(result.exception, SystemExit)
            if crashed or result.exit_code not in (0, EXIT_CONFIG_ERROR) or "Traceback" in result.output:
                where = "".join(traceback.format_tb(result.exc_info[2])[-2:]) if crashed else ""
                failures.append(f"case {case}: exit {result.exit_code}, {type(result.exception).__name__}: "
                                f"{result.exception!s:.200}\n{where}")
            elif result.exit_code == EXIT_CONFIG_ERROR and "problem" not in result.output.lower():
                failures.append(f"case {case}: exit 2 without a problem table: {result.output[:200]}")
    finally:
        signal.signal(signal.SIGALRM, previous)
        config.write_text(original_config)
        backend.write_text(original_backend)
    assert not failures, "\n".join(failures[:20])
