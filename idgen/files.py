"""Atomic file writes: a reader sees the old file or the whole new one, never a partial write."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, on any
    error it is removed and ``path`` is left as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    os.close(fd)
    try:
        yield staging
        os.chmod(staging, 0o666 & ~_umask())  # mkstemp makes 0600; a new file follows the umask
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.remove(staging)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
