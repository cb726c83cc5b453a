"""What the user sees during a run: the startup table, the progress line, TensorBoard scalars and the
closing summary (the loss curve PNG is loss_plot.py's)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text


def startup_table(rows: dict[str, object]) -> Table:
    table = Table(title="longcat train", show_header=False)
    table.add_column("setting", style="bold")
    table.add_column("value")
    for key, value in rows.items():
        table.add_row(key, Text(str(value)))  # user values (dataset ids like `[clips]`) are not markup
    return table


@dataclass
class RunLog:
    """Loss history and timing; writes TensorBoard scalars when a writer is given, and one JSON
    line per event (each step, checkpoint, validation) to `events_path` when given: the record a
    script or a benchmark reads, appended across resumes."""

    writer: object | None = None
    events_path: Path | None = None
    ema_decay: float = 0.9
    losses: list[tuple[int, float]] = field(default_factory=list)
    ema: float | None = None
    step_times: list[float] = field(default_factory=list)
    _last: float = field(default_factory=time.perf_counter)

    @property
    def last_seconds(self) -> float:
        """Seconds since the previous step was recorded (the running step's time so far)."""
        return time.perf_counter() - self._last

    def record(self, step: int, loss: float, lr: float, grad_norm: float | None, extra: dict[str, float]) -> float:
        now = time.perf_counter()
        seconds = now - self._last
        self._last = now
        self.step_times.append(seconds)
        self.losses.append((step, loss))
        self.ema = loss if self.ema is None else self.ema_decay * self.ema + (1 - self.ema_decay) * loss
        scalars = {"train/loss": loss, "train/loss_ema": self.ema, "train/lr": lr, "perf/s_per_step": seconds, **extra}
        if grad_norm is not None:
            scalars["train/grad_norm"] = grad_norm
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
        self.event("step", step=step, **{name.split("/")[-1]: value for name, value in scalars.items()})
        return seconds

    def restart_clock(self) -> None:
        """The next step's time starts now (after a checkpoint or a validation, which are not steps)."""
        self._last = time.perf_counter()

    def event(self, name: str, **fields: object) -> None:
        """Append `{"event": name, "time": unix seconds, **fields}` to the events file."""
        if self.events_path is None:
            return
        with open(self.events_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"event": name, "time": time.time(), **fields}) + "\n")


@dataclass
class PlainProgress:
    """Progress where the bar is off (output to a file, a pipe, nohup, Slurm): one plain line at the
    first and last step and then every `every_steps` steps or `every_seconds`, whichever first."""

    console: Console
    total_steps: int
    every_steps: int = 10
    every_seconds: float = 30.0
    _printed_at: float | None = None

    def update(self, step: int, loss: float, ema: float, lr: float, step_times: list[float]) -> None:
        now = time.monotonic()
        due = (self._printed_at is None or step == self.total_steps or step % self.every_steps == 0
               or now - self._printed_at >= self.every_seconds)
        if not due:
            return
        self._printed_at = now
        recent = sorted(step_times[-10:])
        s_per_step = recent[len(recent) // 2]  # the median of the last ten: checkpoints do not skew it
        eta = time.strftime("%H:%M:%S", time.gmtime((self.total_steps - step) * s_per_step))
        self.console.print(f"step {step}/{self.total_steps} loss {loss:.4f} ema {ema:.4f} lr {lr:.2e} "
                           f"{s_per_step:.2f} s/step peak VRAM {peak_vram_gib():.1f} GiB ETA {eta}",
                           markup=False, highlight=False, soft_wrap=True)


def progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]step"),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
    )


def peak_vram_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
