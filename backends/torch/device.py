"""Which device the torch backend puts arrays on: $SWITCHSAE_DEVICE, else CUDA when present, else
CPU.  How CPU memory is handed out: `switchsae.backends.host_memory` (shared with JAX)."""

from __future__ import annotations

import os

import torch

from ..host_memory import KEEP_FREED_ENV_VAR, keep_freed_cpu_memory  # noqa: F401 - re-exported

ENV_VAR = "SWITCHSAE_DEVICE"


class DeviceError(RuntimeError):
    """$SWITCHSAE_DEVICE names a device torch cannot use here."""


def select_device(name: str | None = None) -> torch.device:
    """`name` (e.g. "cpu", "cuda:1", "mps"), else $SWITCHSAE_DEVICE, else cuda if available, else cpu."""
    name = name or os.environ.get(ENV_VAR, "").strip()
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise DeviceError(f"{ENV_VAR}={name!r} is not a torch device: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"{ENV_VAR}={name!r} asks for CUDA, but torch sees no CUDA device")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"{ENV_VAR}={name!r} asks for MPS, but it is not available")
    return device
