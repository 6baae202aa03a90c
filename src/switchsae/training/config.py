"""`TrainConfig`: how long, how fast and how often a Switch SAE is trained, logged and saved."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from switchsae.core.config import PAPER_LR_ANCHOR, ConfigError, check_int, check_number, scaled_lr
from switchsae.core.optim import OPTIMIZERS

# Settings derived from the run's size (measured: README "Training defaults")
WARMUP_FRACTION = 0.01     # warm-up over the first 1% of the steps
DEAD_FRACTION = 0.05       # dead after 5% of the tokens it could fire on in the run without firing ...
DEAD_TOKENS_CAP = 10_000_000  # ... or 10M tokens (Gao et al.'s window), whichever is smaller
SELECTION_BIAS_STEP = 0.3  # the selection bias's step with top-1 routing (README "Dead latents")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping settings (the model itself is a `SwitchSAEConfig`).

    steps: optimiser updates.  batch_size: tokens per update (the data source's batch).
    lr: peak Adam learning rate; `None`: the model config's `default_lr` (LR_ANCHOR /
        sqrt(m / 2**14) for m latents per expert, at most LR_MAX), or with `lr_anchor` set,
        lr_anchor / sqrt(M / 2**14) (the paper's rule, `TrainConfig.paper()`: 2e-4).
    lr_anchor: see `lr` (None: the library's rule).
    warmup_steps: linear warm-up from 0 to `lr`; `None`: 1% of the steps.
    decay_fraction: the final fraction of the steps over which the rate decays linearly to 0
        (the paper: 0.2).
    max_grad_norm: global gradient-norm clip (`None`: off).
    optimizer: "adam" (dense) or "lazy_adam" (row-sparse: only the latents that received
        gradient are updated, see `switchsae.core.optim`).
    seed: initialisation seed (the data order has its own seed in the source).
    log_every / checkpoint_every: steps between metric lines / resumable checkpoints (the
        last step always logs and checkpoints).  keep_checkpoints: how many to keep.
    dead_tokens: tokens without firing after which a latent counts as dead (AuxK and the
        dead fraction), in the tokens `dead_count` counts; `None` means the model config's
        `dead_tokens`, and when that is None too, 5% of the tokens a latent could fire on in
        the run (`dead_threshold`), at least one batch's worth of them, at most 10M.
    dead_count: "expert" (default): a latent's silence counts the tokens routed to its expert,
        the only ones it can fire on; "batch" (the paper's code, Gao et al.): every token.
    normalize: scale activations by a power of two so their mean squared norm is ~d_in
        (see `switchsae.training.normalize`).
    selection_bias: the step of the latents' selection bias (`switchsae.core.selection_bias`:
        the main TopK lifts under-firing latents, no loss term), in units of the expert's
        TopK threshold; 0: off; `None`: 0.3 with top-1 routing, off with several experts per
        token (which it does not support).  selection_bias_floor: a latent under-fires below
        this fraction of k / m.  selection_bias_fade: the final fraction of the steps over
        which the bias fades linearly to 0.
    out_dir: run directory (metrics, checkpoints, report); `None` keeps nothing on disk.
    """

    steps: int = 1000
    batch_size: int = 4096
    lr: float | None = None
    lr_anchor: float | None = None
    warmup_steps: int | None = None
    decay_fraction: float = 0.2
    max_grad_norm: float | None = 1.0
    optimizer: str = "adam"
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    dead_tokens: int | None = None
    dead_count: str = "expert"
    normalize: bool = True
    selection_bias: float | None = None
    selection_bias_floor: float = 0.3
    selection_bias_fade: float = 0.2
    out_dir: str | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
            check_int(name, getattr(self, name), 1)
        if self.warmup_steps is not None:
            check_int("warmup_steps", self.warmup_steps, 0)
        check_int("seed", self.seed, 0)
        if self.dead_tokens is not None:
            check_int("dead_tokens", self.dead_tokens, 1)
        if self.dead_count not in ("expert", "batch"):
            raise ConfigError(f"dead_count must be 'expert' or 'batch', got {self.dead_count!r}")
        if self.lr is not None:
            check_number("lr", self.lr, 0.0, above=True)
        if self.lr_anchor is not None:
            check_number("lr_anchor", self.lr_anchor, 0.0, above=True)
        for name in ("decay_fraction", "selection_bias_fade"):
            check_number(name, getattr(self, name), 0.0)
            if getattr(self, name) > 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.selection_bias is not None:
            check_number("selection_bias", self.selection_bias, 0.0)
        check_number("selection_bias_floor", self.selection_bias_floor, 0.0)
        if self.max_grad_norm is not None:
            check_number("max_grad_norm", self.max_grad_norm, 0.0, above=True)
        if not isinstance(self.normalize, bool):
            raise ConfigError(f"normalize must be true or false, got {self.normalize!r}")
        if self.out_dir is not None and not isinstance(self.out_dir, str):
            raise ConfigError(f"out_dir must be a path string or None, got {self.out_dir!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        decay_start = self.steps - round(self.decay_fraction * self.steps)
        if self.warmup > decay_start:
            raise ConfigError(
                f"warmup_steps ({self.warmup}) runs into the decay, which starts at step "
                f"{decay_start} of {self.steps}"
            )

    @classmethod
    def preset(cls, name: str, **fields) -> TrainConfig:
        """The schedule of preset `name`: "default" (the library's) or "paper" (`paper()`)."""
        if name not in ("default", "paper"):
            raise ConfigError(f"unknown preset {name!r}; known: ['default', 'paper']")
        return cls.paper(**fields) if name == "paper" else cls(**fields)

    @classmethod
    def paper(cls, **fields) -> TrainConfig:
        """The paper's schedule (Mudide et al.'s code): lr 2e-4 / sqrt(M / 2**14), no warm-up,
        linear decay over the last 20%, gradient norm clipped to 1, dead latents counted over
        every token, no selection bias; `fields` override."""
        return cls(**{"lr_anchor": PAPER_LR_ANCHOR, "warmup_steps": 0, "decay_fraction": 0.2,
                      "max_grad_norm": 1.0, "dead_count": "batch", "selection_bias": 0.0, **fields})

    @property
    def warmup(self) -> int:
        """Warm-up steps in effect (`warmup_steps`, or 1% of the steps)."""
        return round(WARMUP_FRACTION * self.steps) if self.warmup_steps is None else self.warmup_steps

    def learning_rate(self, model_cfg) -> float:
        """The peak learning rate in effect for `model_cfg`."""
        if self.lr is not None:
            return float(self.lr)
        return model_cfg.default_lr if self.lr_anchor is None else scaled_lr(self.lr_anchor, model_cfg.n_latents)

    def selection_bias_step(self, model_cfg) -> float:
        """The selection bias's step in effect for `model_cfg` (0: off); ConfigError where it
        is asked for with several experts per token."""
        if self.selection_bias is None:
            return SELECTION_BIAS_STEP if model_cfg.experts_per_token == 1 else 0.0
        if self.selection_bias and model_cfg.experts_per_token != 1:
            raise ConfigError(f"selection_bias needs top-1 routing (experts_per_token = 1), got experts_per_token = "
                              f"{model_cfg.experts_per_token}; set selection_bias to 0")
        return float(self.selection_bias)

    def dead_threshold(self, model_cfg) -> int:
        """Tokens without firing that make a latent dead: `dead_tokens`, else the model
        config's, else derived from the run's size: DEAD_FRACTION of the tokens a latent sees
        in the run, at least one batch's worth, at most DEAD_TOKENS_CAP.  A latent sees every
        token with `dead_count="batch"`; with "expert", those routed to its expert: e / N of
        them for N experts and e experts per token (a shared expert's latents see every
        token, so for them the window is N / e times shorter in run terms)."""
        if self.dead_tokens is not None:
            return int(self.dead_tokens)
        if model_cfg.dead_tokens is not None:
            return int(model_cfg.dead_tokens)
        share = model_cfg.experts_per_token / model_cfg.n_experts if self.dead_count == "expert" else 1.0
        per_batch = max(1, round(share * self.batch_size))
        run = round(DEAD_FRACTION * share * self.steps * self.batch_size)
        return min(DEAD_TOKENS_CAP, max(per_batch, run))

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

