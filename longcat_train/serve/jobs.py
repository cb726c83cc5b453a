"""The render queue: jobs run one at a time on one worker thread, so two renders never share the
GPU; the model is freed under the same lock, never under a running render."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RenderJob:
    """One render's request and live state, as the page shows it (`as_json`)."""

    id: int
    request: dict[str, Any]
    state: str = "queued"  # queued, running, done, failed
    phase: str = "waiting"
    step: int = 0
    steps: int = 0
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    first_step_at: float | None = None
    eta_s: float | None = None
    video: str | None = None  # relative to output_dir
    sheet: str | None = None
    first_frame_psnr: float | None = None
    error: str | None = None

    def on_step(self, done: int, total: int) -> None:
        """The sampler's callback: step k/N and the time left at the pace of the steps after the
        first (the first one's time also holds prompt encoding and model loading)."""
        now = time.time()
        if self.first_step_at is None:
            self.first_step_at = now
            pace = now - (self.started or now)
        else:
            pace = (now - self.first_step_at) / (done - 1)
        self.step, self.steps = done, total
        self.eta_s = pace * (total - done)
        self.phase = "decoding" if done == total else "denoising"

    def as_json(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in (
            "id", "request", "state", "phase", "step", "steps", "submitted", "started", "finished", "eta_s",
            "video", "sheet", "first_frame_psnr", "error")}


class RenderQueue:
    """`submit` jobs; `run(job)` renders each on the worker thread (exceptions mark it failed)."""

    def __init__(self, run: Callable[[RenderJob], None]) -> None:
        self._run = run
        self._pending: queue.Queue[RenderJob | None] = queue.Queue()
        self._jobs: dict[int, RenderJob] = {}
        self._ids = itertools.count(1)
        self.device_lock = threading.Lock()  # held while a render or a free runs
        self._worker = threading.Thread(target=self._work, name="longcat-render", daemon=True)
        self._worker.start()

    def submit(self, request: dict[str, Any], steps: int) -> RenderJob:
        job = RenderJob(next(self._ids), request, steps=steps)
        self._jobs[job.id] = job
        self._pending.put(job)
        return job

    def jobs(self) -> list[RenderJob]:
        return list(self._jobs.values())

    def get(self, job_id: int) -> RenderJob | None:
        return self._jobs.get(job_id)

    def stop(self) -> None:
        self._pending.put(None)
        self._worker.join(timeout=60)

    def _work(self) -> None:
        while (job := self._pending.get()) is not None:
            with self.device_lock:
                job.state, job.phase, job.started = "running", "preparing", time.time()
                try:
                    self._run(job)
                    job.state, job.phase, job.eta_s = "done", "done", 0.0
                except Exception as error:  # noqa: BLE001 - a failed render is shown on the page, the queue goes on
                    job.state, job.phase, job.error = "failed", "failed", f"{type(error).__name__}: {error}"
                finally:
                    job.finished = time.time()
