"""`TrainConfig`: how long, how fast and how often a Switch SAE is trained, logged and saved."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from switchsae.core.config import ConfigError, check_int, check_number


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
            check_int(name, getattr(self, name), 1)
        check_int("warmup_steps", self.warmup_steps, 0)
        check_int("seed", self.seed, 0)
        if self.dead_tokens is not None:
            check_int("dead_tokens", self.dead_tokens, 1)
        if self.lr is not None:
            check_number("lr", self.lr, 0.0, above=True)
        check_number("decay_fraction", self.decay_fraction, 0.0)
        if self.decay_fraction > 1.0:
            raise ConfigError(f"decay_fraction must be in [0, 1], got {self.decay_fraction!r}")
        if self.max_grad_norm is not None:
            check_number("max_grad_norm", self.max_grad_norm, 0.0, above=True)
        if not isinstance(self.normalize, bool):
            raise ConfigError(f"normalize must be true or false, got {self.normalize!r}")
        if self.out_dir is not None and not isinstance(self.out_dir, str):
            raise ConfigError(f"out_dir must be a path string or None, got {self.out_dir!r}")
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
        if not isinstance(data, dict):
            raise ConfigError(f"a train config must be a JSON object / dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown train config fields {unknown}; known: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

