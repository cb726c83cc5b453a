"""loss.png from events.jsonl: the whole run across a resume, and a checkpoint that never fails over it."""

import builtins
import json

from PIL import Image

from longcat_train.training import loss_plot
from longcat_train.training.loss_plot import loss_series, read_events, write_loss_curve


def _step(step: int, loss: float) -> dict:
    return {"event": "step", "step": step, "loss": loss, "loss_ema": loss + 0.5, "lr": 1e-4 * step}


def _killed_and_resumed_run() -> list[dict]:
    """Steps 1-6, a checkpoint at 4, a kill after 6; the resumed run re-does 5 and 6 and goes on to 8."""
    return [
        {"event": "start", "step": 0},
        *(_step(s, 1.0) for s in range(1, 5)),
        {"event": "validation", "step": 4, "validation/heldout_loss": 0.9},
        {"event": "checkpoint", "step": 4},
        *(_step(s, 1.0) for s in (5, 6)),
        {"event": "validation", "step": 6, "validation/heldout_loss": 0.8},
        {"event": "start", "step": 4},
        *(_step(s, 2.0) for s in range(5, 9)),
        {"event": "validation", "step": 8, "validation/heldout_loss": 0.7},
    ]


def _write(path, events, torn_tail: bool = False):
    text = "".join(json.dumps(e) + "\n" for e in events)
    path.write_text(text + ('{"event": "st' if torn_tail else ""))
    return path


def test_resumed_steps_replace_the_killed_runs_and_held_out_points_are_kept():
    series = loss_series(_killed_and_resumed_run())
    assert series["steps"] == list(range(1, 9))
    assert series["loss"] == [1.0] * 4 + [2.0] * 4  # 5 and 6 from the resumed run
    assert series["ema"] == [1.5] * 4 + [2.5] * 4
    assert series["lr"] == [1e-4 * s for s in range(1, 9)]
    assert (series["heldout_steps"], series["heldout"]) == ([4, 8], [0.9, 0.7])  # 6's was re-done
    assert series["resumes"] == [4]


def test_a_later_line_for_the_same_step_wins():
    series = loss_series([_step(1, 1.0), _step(2, 1.0), _step(2, 3.0)])
    assert (series["steps"], series["loss"]) == ([1, 2], [1.0, 3.0])


def test_the_plot_is_written_from_the_events_file(tmp_path):
    run = tmp_path / "my-run"
    run.mkdir()
    events = _write(run / "events.jsonl", _killed_and_resumed_run(), torn_tail=True)  # a kill -9 mid-line
    assert len(read_events(events)) == len(_killed_and_resumed_run())
    warnings = []
    png = write_loss_curve(events, run / "loss.png", warn=warnings.append)
    assert warnings == [] and png == run / "loss.png"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (1000, 500)
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 20  # axes, text and lines, not blank
    assert sorted(p.name for p in run.iterdir()) == ["events.jsonl", "loss.png"]  # no temporary file left


def test_a_long_run_is_plotted(tmp_path):
    events = _write(tmp_path / "events.jsonl", [{"event": "start", "step": 0}, *(_step(s, 1 / s) for s in range(1, 10_001))])
    warnings = []
    assert write_loss_curve(events, tmp_path / "loss.png", warn=warnings.append) == tmp_path / "loss.png"
    assert warnings == []


def test_missing_matplotlib_skips_the_plot_and_says_so_once(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    monkeypatch.setattr(loss_plot, "_missing_matplotlib_said", False)
    events = _write(tmp_path / "events.jsonl", _killed_and_resumed_run())
    warnings = []
    assert write_loss_curve(events, tmp_path / "loss.png", warn=warnings.append) is None
    assert write_loss_curve(events, tmp_path / "loss.png", warn=warnings.append) is None
    assert len(warnings) == 1 and "pip install matplotlib" in warnings[0]
    assert not (tmp_path / "loss.png").exists()


def test_a_plotting_error_is_reported_not_raised(tmp_path):
    warnings = []
    assert write_loss_curve(tmp_path / "missing.jsonl", tmp_path / "loss.png", warn=warnings.append) is None
    assert len(warnings) == 1 and "FileNotFoundError" in warnings[0]
