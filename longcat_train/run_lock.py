"""One run per directory: an exclusive lock that names its holder.

`<dir>/.longcat.lock` is held with `flock`, so the kernel drops it the moment its holder exits or
is killed: a lock left by a dead process is simply taken by the next run, with nothing to clean
up. The file also says who holds it (PID, host, start time, command), which is what a second run
that finds the directory taken prints. (flock rather than a PID file alone: a PID file needs a
liveness guess, which fails across hosts and after PID reuse.)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

LOCK_FILE = ".longcat.lock"
WAIT_POLL_SECONDS = 2.0


class DirectoryInUse(RuntimeError):
    """Another live process holds the directory's lock; the message names it."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        info = {}
    if not info:
        return "another process"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"PID {info.get('pid')} on host {info.get('host')} (since {started}: {info.get('command', '?')})"


@contextlib.contextmanager
def hold_directory(directory: Path, purpose: str, wait: bool = False,
                   on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold `directory`'s lock for the `with` block. Taken: raise `DirectoryInUse` naming the
    holder, or with `wait`, call `on_wait(message)` once and wait until it is free."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    handle = open(path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            message = f"{directory} is in use ({purpose}) by {_holder(path)}"
            if not wait:
                raise DirectoryInUse(message) from None
            if on_wait is not None:
                on_wait(f"waiting: {message}")
            while True:
                time.sleep(WAIT_POLL_SECONDS)
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    continue
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                                 "command": " ".join(sys.argv), "purpose": purpose}))
        handle.flush()
        yield
    finally:
        handle.close()  # closing the file releases the flock
