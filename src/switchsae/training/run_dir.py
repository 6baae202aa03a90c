"""A training run's directory: who may write it (a lock), and what it already holds.

    <run>/.switchsae.lock     held (flock) by the one Trainer writing the run; the OS drops it
                              when that process dies, however it dies
    <run>/metrics.jsonl       one line per logged step
    <run>/checkpoints/step_N  resumable checkpoints (`switchsae.checkpoint`)

A new run refuses a directory that already holds a complete checkpoint (resume it instead)
or files the library did not write; a run killed before its first checkpoint holds nothing
to resume and may be started again in place."""

from __future__ import annotations

import os
from pathlib import Path

from switchsae import checkpoint as ckpt_io
from switchsae.files import recover_children
from switchsae.validation import PathError, check_output_dir

LOCK_FILE = ".switchsae.lock"
METRICS_FILE = "metrics.jsonl"
# what a run directory holds before its first complete checkpoint
_RUN_ENTRIES = {LOCK_FILE, METRICS_FILE, ckpt_io.CHECKPOINTS_DIR}

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, runs are not protected from each other
    fcntl = None


class RunDirError(PathError):
    """A run directory that is in use, or holds what a new run must not overwrite."""


def check_new_run_dir(out_dir, other_files: bool = False) -> Path:
    """`out_dir` if a new run may start there: it is missing, empty, or a run stopped before
    its first checkpoint (nothing to resume), and no other process trains in it; with
    `other_files`, files the run does not write may be there too.  Writes nothing.  Raises
    RunDirError (or PathError for an unusable path)."""
    out = check_output_dir(out_dir, "run directory")
    if not out.is_dir():
        return out
    if ckpt_io.list_checkpoints(out):
        raise RunDirError(f"{out} already holds a training run (checkpoint {ckpt_io.list_checkpoints(out)[-1].name}); "
                          f"resume it (switchsae train --resume {out}, Trainer.resume) or choose another directory")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in _RUN_ENTRIES)
    if foreign and not other_files:
        raise RunDirError(f"run directory {out} is not empty and holds no training run ({', '.join(foreign[:3])}"
                          f"{', ...' if len(foreign) > 3 else ''}); choose another directory")
    _check_unlocked(out)
    return out


class RunLock:
    """An exclusive lock on a run directory for as long as this object lives (or `release`)."""

    def __init__(self, out_dir):
        out = check_output_dir(out_dir, "run directory")
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / LOCK_FILE
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _holder(self._fd)
                os.close(self._fd)
                self._fd = None
                raise RunDirError(f"{out} is in use by another training run{holder}; wait for it to "
                                  "finish or stop it first") from None
            os.ftruncate(self._fd, 0)
            os.write(self._fd, f"{os.getpid()}\n".encode())
        recover_children(out / ckpt_io.CHECKPOINTS_DIR)  # finish what a killed writer left

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __del__(self):
        self.release()


def _check_unlocked(out: Path) -> None:
    lock = out / LOCK_FILE
    if fcntl is None or not lock.is_file():
        return
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        raise RunDirError(f"{out} is in use by another training run{_holder(fd)}") from None
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except OSError:
        return ""
    return f" (process {pid})" if pid.isdigit() else ""
