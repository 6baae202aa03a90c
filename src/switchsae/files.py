"""Writing all or nothing: a file into a temporary file in the same directory, fsync,
os.replace, then fsync the directory, so a crash leaves the old file or the new one, never a
torn one; a directory of files likewise (`atomic_write_dir`), recoverable after a crash at any
point (`recover_dir`)."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Callable

CRASH_ENV = "SWITCHSAE_CRASH_AT"


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


# -- directories ------------------------------------------------------------------------------
# beside `<dir>/<name>`: `.<name>.tmp-<t>` (being written), `.<name>.old-<t>` (the version it
# replaces, moved aside for one rename), `.<name>.deleting-<t>` (being removed)
_SIDE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|deleting)-(?P<token>[0-9a-f]+)$")


def atomic_write_dir(path, files: dict) -> Path:
    """Write directory `path` holding `files` (name -> bytes), all or nothing: built in a hidden
    sibling, every file fsynced, then moved into place.  An existing `path` is replaced (the
    caller decides whether it may be): it is renamed aside, the new one renamed in, the old one
    deleted.  A crash anywhere leaves the old or the new directory, or, between the two
    renames, both under hidden names that `recover_dir(path)` (which every reader of the path
    should call) turns back into `path`.  -> path."""
    path = Path(path)
    recover_dir(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(6)
    tmp, old = _side(path, "tmp", token), _side(path, "old", token)
    try:
        tmp.mkdir()
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            crash_point("write_dir:file")
        fsync_dir(tmp)
        crash_point("write_dir:complete")
        if path.exists():
            os.rename(path, old)
            fsync_dir(path.parent)
            crash_point("write_dir:between_renames")
        os.rename(tmp, path)
        fsync_dir(path.parent)
        crash_point("write_dir:renamed")
    except BaseException:
        if not path.exists() and old.exists():
            os.rename(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return path


def remove_dir(path) -> None:
    """Delete directory `path` so that it never shows half-deleted: renamed to a hidden
    sibling first (one atomic step), then removed (`recover_dir` finishes a killed removal)."""
    path = Path(path)
    gone = _side(path, "deleting", secrets.token_hex(6))
    os.rename(path, gone)
    crash_point("remove_dir:renamed")
    shutil.rmtree(gone)


def recover_dir(path, clean: bool = True) -> None:
    """Finish or undo what a killed `atomic_write_dir` / `remove_dir` of `path` left beside
    it: a complete new version replaced halfway is moved into place (else the old one back);
    with `clean` (writers only: a reader could race a live writer) unfinished temporaries and
    removals are deleted.  A no-op when nothing was left."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        return
    sides = {}
    for entry in parent.iterdir():
        m = _SIDE.match(entry.name)
        if m and m["name"] == path.name:
            sides.setdefault(m["kind"], []).append((m["token"], entry))
    if not sides:
        return
    tmps = dict(sides.get("tmp", []))
    for token, old in sides.get("old", []):
        if not path.exists():
            # the old version moves aside only once the new one is complete: finish the replace
            os.rename(tmps.pop(token) if token in tmps else old, path)
        shutil.rmtree(old, ignore_errors=True)
    if clean:
        for entry in [*tmps.values(), *(e for _, e in sides.get("deleting", []))]:
            shutil.rmtree(entry, ignore_errors=True)
    fsync_dir(parent)


def recover_children(directory) -> None:
    """`recover_dir` for every directory of `directory` that a killed writer left side entries of."""
    directory = Path(directory)
    if directory.is_dir():
        names = {m["name"] for e in directory.iterdir() if (m := _SIDE.match(e.name))}
        for name in sorted(names):
            recover_dir(directory / name)


def _side(path: Path, kind: str, token: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{token}"


def crash_point(name: str) -> None:
    """Tests only: SIGKILL this process at the named point when $SWITCHSAE_CRASH_AT is
    `name` (or `name#n`: at its n-th pass).  Costs one environment lookup otherwise."""
    wanted = os.environ.get(CRASH_ENV)
    if not wanted or not wanted.startswith(name):
        return
    target, _, nth = wanted.partition("#")
    if target != name:
        return
    _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if _crash_counts[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


_crash_counts: dict = {}
