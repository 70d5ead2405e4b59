"""Atomic file writes: a reader sees the old file or the whole new one, never a partial write."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator

from PIL.PngImagePlugin import PngInfo


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, on any
    error it is removed and ``path`` is left as it was. The file gets mode 0666 less the umask, as
    any new file, also when the writer replaced it with a file of its own mode (safetensors writes
    0600)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    staging = os.path.join(folder, f"{temporary_prefix()}{uuid.uuid4().hex[:12]}-{os.path.basename(path)}")
    mode = _create(staging)
    try:
        yield staging
        os.chmod(staging, mode)
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.remove(staging)


_TEMPORARY = re.compile(r"^\.tmp-(\d+)-")


def temporary_prefix() -> str:
    """How the name of a file or folder being written starts: ``.tmp-<pid>-``, so that a later run
    can tell a killed writer's leftovers (``remove_stale_temporaries``) from a live one's."""
    return f".tmp-{os.getpid()}-"


def remove_stale_temporaries(folder: str) -> list[str]:
    """Remove what writers killed mid-write left in ``folder`` (``.tmp-<pid>-*`` of a process that
    is gone; a live writer's are kept); return the names removed."""
    removed = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        match = _TEMPORARY.match(name)
        if match and not _running(int(match.group(1))):
            path = os.path.join(folder, name)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
            removed.append(name)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _create(path: str) -> int:
    """Create an empty file at ``path`` as any new file is made; return its mode (0666 less the umask)."""
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    return os.stat(path).st_mode & 0o777


def follow_umask(path: str) -> None:
    """Give the file at ``path`` (a folder: every file in it) the mode of a new file (0666 less the
    umask): writers such as safetensors make theirs 0600, which others sharing the folder cannot read."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    probe = os.path.join(folder, f"{temporary_prefix()}{uuid.uuid4().hex[:12]}-mode")
    mode = _create(probe)
    os.remove(probe)
    files = [os.path.join(path, name) for name in os.listdir(path)] if os.path.isdir(path) else [path]
    for file in files:
        if os.path.isfile(file):
            os.chmod(file, mode)


def save_png(image, path: str, metadata: dict[str, str], finish: Callable[[bytes], bytes] | None = None) -> None:
    """Write a PIL ``image`` as PNG with text ``metadata``, atomically; ``finish`` may rewrite the
    PNG bytes first (e.g. to embed signed Content Credentials)."""
    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    data = buffer.getvalue() if finish is None else finish(buffer.getvalue())
    with atomic_path(path) as staging, open(staging, "wb") as handle:
        handle.write(data)
