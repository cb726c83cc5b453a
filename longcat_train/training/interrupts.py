"""Ctrl-C and `kill` stop a run at the next step boundary, with a checkpoint.

The first SIGINT or SIGTERM only records the request: the loop finishes the step it is in, saves
a checkpoint and exits with 128 + the signal number (130, 143), as shells and schedulers expect
of a process that stopped on that signal. A second one while stopping ends the process at once
(the signal's default action), for when the checkpoint itself hangs.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """The first stop signal received, if any."""

    def __init__(self) -> None:
        self.signal: int | None = None

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else ""

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.signal is not None:  # the second one: stop now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signal = signum


class RunInterrupted(RuntimeError):
    """A run stopped on SIGINT / SIGTERM after saving a checkpoint; `exit_code` is 128 + signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Record SIGINT / SIGTERM in the yielded `StopRequest` instead of dying (main thread only;
    elsewhere nothing is installed), and restore the previous handlers afterwards."""
    request = StopRequest()
    try:
        previous = {sig: signal.signal(sig, request._handle) for sig in STOP_SIGNALS}
    except ValueError:  # not the main thread: signals cannot be handled here
        previous = {}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
