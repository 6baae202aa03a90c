"""Writing a file all or nothing: into a temporary file in the same directory, fsync, os.replace,
then fsync the directory, so a crash leaves the old file or the new one, never a torn one."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path, write: Callable) -> Path:
    """write(f) fills a binary file object that becomes `path` only once complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path, obj, **dumps_kwargs) -> Path:
    """obj as JSON (json.dumps keyword arguments, e.g. indent) and a final newline."""
    return atomic_write_bytes(path, (json.dumps(obj, **dumps_kwargs) + "\n").encode())


def fsync_dir(path) -> None:
    """Persist a directory's entries (a rename in it); a no-op where directories cannot be opened
    or synced (e.g. Windows, some network filesystems)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
