"""Files the trainer writes: the permissions the user's umask asks, and written aside then renamed,
so a reader (or a run resumed after a kill) sees the old file or the whole new one, never a part."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def give_umask_mode(path: Path) -> None:
    """Give `path` the mode a file created under this process's umask gets (0o666 & ~umask), as
    safetensors writes 0600 whatever the umask: caches, checkpoints and exported LoRAs stayed
    private to their writer where the umask shares them (a group, a container's other user)."""
    # The umask can only be read by setting it: set to the strictest mask meanwhile, so a file
    # another thread creates in that moment is at worst private, never more open than asked.
    umask = os.umask(0o077)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_aside(path: Path, write: Callable[[Path], object], durable: bool = False) -> Path:
    """Call `write(temporary)` for a temporary name beside `path`, give it the umask's mode, flush it to
    disk when `durable`, and rename it over `path`; a failed write leaves no temporary behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        write(temporary)
        give_umask_mode(temporary)
        if durable:
            with open(temporary, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path
