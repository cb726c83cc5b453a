"""File permissions of what the trainer writes, as the user's umask asks."""

from __future__ import annotations

import os
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
