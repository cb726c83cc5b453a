"""`output_dir/loss.png`: the whole run's loss, loss EMA, learning rate and held-out loss, drawn from
`events.jsonl` (so it spans resumes) with matplotlib, which is imported only here, when drawing."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from ..file_modes import write_aside

HELDOUT_KEY = "validation/heldout_loss"  # the key `Validator.run` gives the mean held-out loss
MARKERS_UP_TO = 60  # points per series drawn with markers; beyond this they would blur into the line

_missing_matplotlib_said = False  # say once per process, not at every checkpoint


def read_events(path: Path) -> list[dict]:
    """The events file's records; a line a kill cut short is passed over."""
    events = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def loss_series(events: Iterable[dict]) -> dict[str, list]:
    """What the plot draws, in step order: `steps`, `loss`, `ema`, `lr`, `heldout_steps`, `heldout`,
    and `resumes` (the steps runs resumed at). A "start" at step s drops what an earlier run logged
    after s (the resumed run re-does those steps), and a later line for a step replaces an earlier one."""
    steps: dict[int, dict] = {}
    heldout: dict[int, float] = {}
    resumes: list[int] = []
    for event in events:
        kind, step = event.get("event"), event.get("step")
        if kind == "start" and step is not None:
            steps = {s: e for s, e in steps.items() if s <= step}
            heldout = {s: v for s, v in heldout.items() if s <= step}
            resumes = [s for s in resumes if s < step]
            if step > 0:
                resumes.append(step)
        elif kind == "step":
            steps[step] = event
        elif kind == "validation" and HELDOUT_KEY in event:
            heldout[step] = event[HELDOUT_KEY]
    order = sorted(steps)
    return {
        "steps": order,
        "loss": [steps[s]["loss"] for s in order],
        "ema": [steps[s]["loss_ema"] for s in order],
        "lr": [steps[s]["lr"] for s in order],
        "heldout_steps": sorted(heldout),
        "heldout": [heldout[s] for s in sorted(heldout)],
        "resumes": resumes,
    }


def write_loss_curve(events_path: Path, png_path: Path, warn: Callable[[str], None] | None = None) -> Path | None:
    """Draw `events_path` into `png_path`; returns it, or None when nothing was drawn. Never raises:
    a checkpoint must not fail over its plot, so problems (matplotlib missing, said once) go to `warn`."""
    global _missing_matplotlib_said
    warn = warn or logging.getLogger(__name__).warning
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on a training box
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        if not _missing_matplotlib_said:
            _missing_matplotlib_said = True
            warn("loss.png is not drawn: matplotlib is not installed (`pip install matplotlib` gives loss.png)")
        return None
    try:
        series = loss_series(read_events(events_path))
        steps = series["steps"]
        few = len(steps) <= MARKERS_UP_TO
        fig, ax = plt.subplots(figsize=(10, 5), dpi=100, layout="constrained")
        try:
            lr_ax = ax.twinx()
            lr_ax.plot(steps, series["lr"], color="tab:green", linewidth=1, linestyle="--", label="learning rate")
            ax.plot(steps, series["loss"], color="tab:blue", linewidth=0.8, alpha=0.35, label="loss",
                    marker="o" if few else None, markersize=3)
            ax.plot(steps, series["ema"], color="tab:blue", linewidth=2, label="loss EMA")
            if series["heldout"]:  # in the legend only when there are points
                ax.plot(series["heldout_steps"], series["heldout"], color="tab:red", linewidth=1, marker="D",
                        markersize=5, label="held-out loss")
            for index, step in enumerate(series["resumes"]):
                ax.axvline(step, color="grey", linewidth=0.8, linestyle=":", label="resumed" if index == 0 else None)
            ax.set_zorder(lr_ax.get_zorder() + 1)  # the losses over the lr line, with the lr axis still drawn
            ax.patch.set_visible(False)
            ax.set_xlabel("step")
            ax.set_ylabel("loss")
            lr_ax.set_ylabel("learning rate")
            lr_ax.set_ylim(bottom=0)  # a constant lr otherwise sits on an axis zoomed into its last digits
            lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            handles = [h for a in (ax, lr_ax) for h in a.get_legend_handles_labels()[0]]
            if steps:  # below the axes: inside, it would hide a curve at one end or the other
                fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize="small",
                           frameon=False)
            last = f"step {steps[-1]}" if steps else "no steps yet"
            ax.set_title(f"{Path(events_path).parent.name}: {last}")
            write_aside(Path(png_path), lambda temporary: fig.savefig(temporary, format="png"))
        finally:
            plt.close(fig)
    except Exception as error:  # noqa: BLE001 - the plot is a convenience; the checkpoint is already saved
        warn(f"loss.png is not drawn: {type(error).__name__}: {error}")
        return None
    return Path(png_path)
