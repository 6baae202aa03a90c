"""Run a launcher (torchrun, mlx.launch, a subprocess with XLA_FLAGS) for the multi-process
tests: one CPU thread per process, its own process group (killed whole on a timeout)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def run(cmd: list, timeout_s: float, env: dict | None = None, cwd=None) -> tuple[int, str]:
    """-> (exit status, output).  Fails the test when it runs past timeout_s."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SWITCHSAE_DEVICE": "cpu", **(env or {})}
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=cwd, env=env, start_new_session=True)
    try:
        log = proc.communicate(timeout=timeout_s)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"{cmd[:3]} did not finish in {timeout_s} s:\n{proc.communicate()[0]}")
    return proc.returncode, log


def torchrun(world: int, *args) -> list:
    """`torchrun --standalone --nproc-per-node world *args` (picks a free port)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", world, *args]


def mlx_launch(world: int, *args) -> list:
    """`mlx.launch -n world --backend ring` on 127.0.0.1 (plain TCP: runs on a Linux CPU) -- *args.
    mlx.launch exits 0 even when a rank fails: judge by what the ranks write."""
    beside = Path(sys.executable).with_name("mlx.launch")
    found = str(beside) if beside.exists() else shutil.which("mlx.launch")
    assert found, "mlx.launch (installed with mlx) not found beside the interpreter or on PATH"
    return [found, "-n", world, "--backend", "ring", "--starting-port", _free_ports(world), "--", *args]


def _free_ports(n: int) -> int:
    """A port p with p .. p + n - 1 free (the ring backend listens on starting port + rank)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                others = [socket.socket() for _ in range(n - 1)]
                for i, s in enumerate(others, 1):
                    s.bind(("127.0.0.1", port + i))
            except OSError:
                continue
            finally:
                for s in others:
                    s.close()
            return port
    raise RuntimeError(f"no {n} consecutive free ports on 127.0.0.1")
