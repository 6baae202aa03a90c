"""The Switch SAE specification, written against the Python Array API standard only.

The spec says *what* is computed; `switchsae.backends` say *how*, fast."""

from .backend import Backend
from .config import ConfigError, SwitchSAEConfig
from .spec import ForwardOutput, Trace, forward, trace
from .init import geometric_median, init_params
from .optim import AdamState, adam_init, adam_update, clip_by_global_norm
from .train_step import train_step

__all__ = [
    "AdamState", "Backend", "ConfigError", "ForwardOutput", "SwitchSAEConfig", "Trace",
    "adam_init", "adam_update", "clip_by_global_norm", "forward", "geometric_median",
    "init_params", "trace", "train_step",
]
