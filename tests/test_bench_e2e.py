"""`longcat bench --mode e2e` at the tiny scale: the harness that runs the user's path (cache, train,
SIGKILL, resume, validate) on a release-layout checkpoint, here small enough for the CPU."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from longcat_train.bench_e2e import RESULTS_FILE
from longcat_train.cli import app


def test_tiny_end_to_end_run_kills_resumes_identically_and_renders(tmp_path: Path) -> None:
    workdir = tmp_path / "e2e"
    result = CliRunner().invoke(app, ["bench", "--mode", "e2e", "--scale", "tiny", "--workdir", str(workdir),
                                      "--resolution", "64x64", "--frames", "17", "--steps", "8", "--rank", "4"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    results = json.loads((workdir / RESULTS_FILE).read_text())
    model = workdir / "model"
    assert json.loads((model / "text_encoder" / "config.json").read_text())["vocab_size"] == 256_384
    assert results["train_killed"]["killed"] and results["train_killed"]["first_step"] == 1
    resumed = results["train_resumed"]
    assert resumed["first_step"] == 3 and resumed["validations_s"]  # from checkpoint-2, validated at 4 and 8
    assert results["resume"]["steps_compared"] and results["resume"]["identical"]
    assert results["validate"]["videos"] and (workdir / results["validate"]["videos"][0]).is_file()
    events = [json.loads(line) for line in (workdir / "output" / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events].count("start") == 2 and events[-1]["event"] == "done"
    assert "resume: steps compared, identical" in result.output


def test_e2e_refuses_too_few_steps_before_any_work(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["bench", "--mode", "e2e", "--scale", "tiny", "--workdir", str(tmp_path / "e"),
                                      "--steps", "4"], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "--steps" in result.output
    assert not (tmp_path / "e").exists()
