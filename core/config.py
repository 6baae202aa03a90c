"""`SwitchSAEConfig`: the sizes, loss coefficients and variant switches of a Switch SAE.

Shapes use d = `d_in`, M = `n_latents`, N = `n_experts`, m = M / N latents per expert.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

DTYPES = ("float32", "bfloat16", "float16", "float64")
# The library's defaults, measured (README "Training defaults"); the paper's are PRESETS["paper"].
LB_ALPHA = 0.1          # lb_coef = LB_ALPHA * d_in
AUXK_COEF = 1 / 32      # Gao et al.'s AuxK weight
LR_ANCHOR = 1.73e-3     # peak Adam rate at m = 2**14 latents per expert, scaled by 1 / sqrt(m / 2**14) ...
LR_MAX = 4e-3           # ... and at most this
PAPER_LR_ANCHOR = 2e-4  # the paper's rule: 2e-4 / sqrt(M / 2**14), M the total latents
ROUTER_SCALES = ("soft", "hard")


class ConfigError(ValueError):
    """A `SwitchSAEConfig` field is out of range, of the wrong type, or unknown."""


def check_int(name: str, value, minimum: int) -> int:
    """value, if it is an integer (not a bool) >= minimum; else ConfigError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
        raise ConfigError(f"{name} must be {what}, got {value!r}")
    return value


def check_number(name: str, value, minimum: float, *, above: bool = False) -> float:
    """value as a float, if it is a finite real number (not a bool or a string) >= minimum
    (> minimum when `above`); else ConfigError naming `name`."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (above and value == minimum):
        bound = f"> {minimum:g}" if above else f">= {minimum:g}"
        raise ConfigError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def scaled_lr(anchor: float, width: int, cap: float = math.inf) -> float:
    """The peak Adam rate for a dictionary of `width` latents: anchor / sqrt(width / 2**14),
    at most `cap` (the paper's scaling law, Fig. 3: its anchor 2e-4 with width = M; the
    library's LR_ANCHOR with width = m, the latents per expert, capped at LR_MAX)."""
    return min(cap, anchor / math.sqrt(width / 2**14))


@dataclass(frozen=True)
class SwitchSAEConfig:
    """Architecture and loss definition of a Switch SAE.

    d_in: width d of the activations.  n_latents: total dictionary size M.
    n_experts: N, each expert owning m = M / N latents.  k: latents kept per token.
    lb_coef: weight of the Switch load-balancing loss; `None` means `LB_ALPHA * d` (0.1 d,
        measured; the paper's 3 d is `preset("paper")`).
    auxk_coef: weight of the AuxK dead-latent loss (default Gao et al.'s 1/32; 0 = off, as
        in the paper's runs).  k_aux: dead latents used by AuxK (`None`: d // 2).
    dead_tokens: a latent that has not fired for this many tokens counts as dead; `None`
        lets the trainer derive it from the run's size (`TrainConfig.dead_threshold`).
    encoder_bias: add a per-expert encoder bias `b_enc (N, m)`.
    router_scale: "soft" scales each expert's decode by its router probability;
        "hard" (the paper's heaviside ablation) scales by 1.
    dtype: parameter and activation dtype.
    experts_per_token: e; route each token to its top-e experts and take one TopK over
        their e*m probability-weighted pre-activations (1 = the paper's Switch SAE).
    shared_latents: width m_s of an always-on shared expert (0 = none); it keeps its own
        `shared_k` of the k latents, the routed experts the other k - shared_k.
    """

    d_in: int
    n_latents: int
    n_experts: int = 1
    k: int = 32
    lb_coef: float | None = None
    auxk_coef: float = AUXK_COEF
    k_aux: int | None = None
    dead_tokens: int | None = None
    encoder_bias: bool = False
    router_scale: str = "soft"
    dtype: str = "float32"
    experts_per_token: int = 1
    shared_latents: int = 0
    shared_k: int = 0
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("d_in", "n_latents", "n_experts", "k", "dead_tokens"):
            if name == "dead_tokens" and getattr(self, name) is None:
                continue
            check_int(name, getattr(self, name), 1)
        if self.n_latents % self.n_experts:
            raise ConfigError(
                f"n_latents ({self.n_latents}) must be divisible by n_experts ({self.n_experts})"
            )
        for name in ("experts_per_token", "shared_latents", "shared_k"):
            check_int(name, getattr(self, name), 0)
        for name in ("encoder_bias",):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.extra, dict):
            raise ConfigError(f"extra must be a dict, got {self.extra!r}")
        if not 1 <= self.experts_per_token <= self.n_experts:
            raise ConfigError(
                f"experts_per_token ({self.experts_per_token}) must be in 1..n_experts ({self.n_experts})"
            )
        if self.shared_latents == 0 and self.shared_k:
            raise ConfigError(f"shared_k ({self.shared_k}) needs a shared expert (shared_latents > 0)")
        if self.shared_latents and not 1 <= self.shared_k < self.k:
            raise ConfigError(
                f"shared_k ({self.shared_k}) must be in 1..k-1 ({self.k - 1}) with a shared expert"
            )
        if self.shared_k > self.shared_latents:
            raise ConfigError(f"shared_k ({self.shared_k}) must be <= shared_latents ({self.shared_latents})")
        candidates = self.experts_per_token * self.expert_width
        if self.routed_k > candidates:
            what = "latents per expert n_latents/n_experts" if self.experts_per_token == 1 \
                else "experts_per_token * latents per expert"
            raise ConfigError(f"k ({self.routed_k}) must be <= {what} ({candidates})")
        if self.router_scale not in ROUTER_SCALES:
            raise ConfigError(f"router_scale must be one of {ROUTER_SCALES}, got {self.router_scale!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.lb_coef is not None:
            check_number("lb_coef", self.lb_coef, 0.0)
        check_number("auxk_coef", self.auxk_coef, 0.0)
        if self.k_aux is not None:
            check_int("k_aux", self.k_aux, 1)

    @property
    def expert_width(self) -> int:
        """m: latents per expert."""
        return self.n_latents // self.n_experts

    @property
    def routed_k(self) -> int:
        """Latents kept per token from the routed experts (k minus the shared expert's)."""
        return self.k - self.shared_k

    @property
    def total_latents(self) -> int:
        """Every latent: the N*m routed ones (ids 0..M-1), then the shared expert's."""
        return self.n_latents + self.shared_latents

    @classmethod
    def preset(cls, name: str, **fields) -> "SwitchSAEConfig":
        """A config with the settings of preset `name` (one of `PRESETS`: "default", the
        library's; "paper", Mudide et al.'s lb_coef = 3 d, no AuxK, dead after 10M tokens);
        `fields` give the sizes and override the preset."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        if "d_in" not in fields:
            raise ConfigError("preset() needs d_in (and n_latents)")
        return cls(**{**PRESETS[name](fields["d_in"]), **fields})

    @property
    def lb_weight(self) -> float:
        """The load-balancing coefficient in effect (default LB_ALPHA * d_in)."""
        return LB_ALPHA * self.d_in if self.lb_coef is None else float(self.lb_coef)

    @property
    def aux_k(self) -> int:
        """Dead latents AuxK reconstructs with per token, capped at the routed candidates."""
        wanted = self.d_in // 2 if self.k_aux is None else self.k_aux
        return min(wanted, self.experts_per_token * self.expert_width)

    @property
    def default_lr(self) -> float:
        """The default peak learning rate: LR_ANCHOR / sqrt(m / 2**14), at most LR_MAX (m: the
        latents per expert, so a FLOP-matched Switch SAE gets its dense TopK SAE's rate)."""
        return scaled_lr(LR_ANCHOR, self.expert_width, LR_MAX)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every parameter (the checkpoint names)."""
        d, n, m = self.d_in, self.n_experts, self.expert_width
        shapes = {
            "b_pre": (d,),
            "b_router": (d,),
            "W_router": (n, d),
            "W_enc": (n, d, m),
            "W_dec": (n, m, d),
        }
        if self.encoder_bias:
            shapes["b_enc"] = (n, m)
        if self.shared_latents:
            shapes["W_enc_shared"] = (d, self.shared_latents)
            shapes["W_dec_shared"] = (self.shared_latents, d)
            if self.encoder_bias:
                shapes["b_enc_shared"] = (self.shared_latents,)
        return shapes

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if not out["extra"]:
            del out["extra"]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "SwitchSAEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a JSON object / dict, got {type(data).__name__}")
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config fields {unknown}; known: {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as e:  # a required field missing
            raise ConfigError(str(e)) from e

    def replace(self, **changes) -> "SwitchSAEConfig":
        return dataclasses.replace(self, **changes)


# name -> d_in -> the preset's fields
PRESETS = {"default": lambda d_in: {},
           "paper": lambda d_in: {"lb_coef": 3.0 * d_in, "auxk_coef": 0.0, "dead_tokens": 10_000_000}}
