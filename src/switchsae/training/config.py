"""`TrainConfig`: how long, how fast and how often a Switch SAE is trained, logged and saved."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from switchsae.core.config import ConfigError


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping settings (the model itself is a `SwitchSAEConfig`).

    steps: optimiser updates.  batch_size: tokens per update (the data source's batch).
    lr: peak Adam learning rate; `None` means the model config's `default_lr` (the paper's
        2e-4 / sqrt(M / 2**14)).
    warmup_steps: linear warm-up from 0 to `lr`.  decay_fraction: the final fraction of the
        steps over which the rate decays linearly to 0 (the paper: 0.2).
    max_grad_norm: global gradient-norm clip (`None`: off).
    seed: initialisation seed (the data order has its own seed in the source).
    log_every / checkpoint_every: steps between metric lines / resumable checkpoints (the
        last step always logs and checkpoints).  keep_checkpoints: how many to keep.
    dead_tokens: tokens without firing after which a latent counts as dead (AuxK and the
        dead fraction); `None` means the model config's `dead_tokens`.
    normalize: scale activations by a power of two so their mean squared norm is ~d_in
        (see `switchsae.training.normalize`).
    out_dir: run directory (metrics, checkpoints, report); `None` keeps nothing on disk.
    """

    steps: int = 1000
    batch_size: int = 4096
    lr: float | None = None
    warmup_steps: int = 0
    decay_fraction: float = 0.2
    max_grad_norm: float | None = 1.0
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    dead_tokens: int | None = None
    normalize: bool = True
    out_dir: str | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("warmup_steps", self.warmup_steps, minimum=0)
        _check_int("seed", self.seed, minimum=0)
        if self.dead_tokens is not None:
            _check_int("dead_tokens", self.dead_tokens, minimum=1)
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a finite number > 0 (or None for the default), got {self.lr!r}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ConfigError(f"decay_fraction must be in [0, 1], got {self.decay_fraction!r}")
        clip = self.max_grad_norm
        if clip is not None and not (math.isfinite(clip) and clip > 0):
            raise ConfigError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}")
        decay_start = self.steps - round(self.decay_fraction * self.steps)
        if self.warmup_steps > decay_start:
            raise ConfigError(
                f"warmup_steps ({self.warmup_steps}) runs into the decay, which starts at step "
                f"{decay_start} of {self.steps}"
            )

    def learning_rate(self, model_cfg) -> float:
        """The peak learning rate in effect for `model_cfg`."""
        return model_cfg.default_lr if self.lr is None else float(self.lr)

    def dead_threshold(self, model_cfg) -> int:
        """Tokens without firing that make a latent dead."""
        return model_cfg.dead_tokens if self.dead_tokens is None else int(self.dead_tokens)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown train config fields {unknown}; known: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
