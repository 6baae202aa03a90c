"""`SwitchSAE`: a config plus parameters on one backend, with input checking."""

from __future__ import annotations

import math

import numpy as np

from switchsae.core import spec
from switchsae.core.config import ConfigError, SwitchSAEConfig
from switchsae.core.init import init_params

from ._active import get_backend
from .validation import check_fits_in_memory


class InputError(ValueError):
    """Bad input to a Switch SAE (shape, dtype, non-finite values)."""


class SwitchSAE:
    """A Switch SAE on a backend.  `params`: dict name -> native array (the spec's names)."""

    def __init__(self, cfg: SwitchSAEConfig, params: dict, backend=None):
        self.cfg = cfg
        self.backend = backend or get_backend()
        self.params = params

    @classmethod
    def init(cls, cfg: SwitchSAEConfig, seed: int = 0, backend=None) -> "SwitchSAE":
        """Random initialisation as specified (same numbers on every backend for a seed).
        A model too large for this machine's memory is a ConfigError stating the bytes needed."""
        if not isinstance(cfg, SwitchSAEConfig):
            raise ConfigError(f"cfg must be a SwitchSAEConfig, got {type(cfg).__name__}")
        check_fits_in_memory(cfg)
        return cls.from_params(cfg, init_params(cfg, seed), backend)  # backend: as from_params

    @classmethod
    def from_params(cls, cfg: SwitchSAEConfig, params: dict, backend=None) -> "SwitchSAE":
        """params: dict name -> NumPy or native array; checked against the config's shapes.
        backend: a Backend, a backend name, or None for the active one."""
        backend = get_backend(backend) if isinstance(backend, str) or backend is None else backend
        expected = cfg.param_shapes()
        missing, unknown = sorted(set(expected) - set(params)), sorted(set(params) - set(expected))
        if missing or unknown:
            raise InputError(f"parameters do not match the config: missing {missing}, unexpected {unknown}")
        native = {}
        for name, shape in expected.items():
            value = params[name]
            if tuple(value.shape) != shape:
                raise InputError(f"parameter {name} has shape {tuple(value.shape)}, config needs {shape}")
            native[name] = backend.asarray(value, cfg.dtype)
        return cls(cfg, native, backend)

    def _check_input(self, x):
        shape = tuple(getattr(x, "shape", ()))
        if len(shape) != 2 or shape[-1] != self.cfg.d_in:
            raise InputError(f"x must have shape (batch, {self.cfg.d_in}); got {shape}")
        if shape[0] == 0:
            raise InputError("x is empty (batch size 0)")
        dtype = str(getattr(x, "dtype", ""))
        if not any(kind in dtype for kind in ("float", "bfloat")):
            raise InputError(f"x must be a floating-point array; got dtype {dtype}")
        x = self.backend.asarray(x, self.cfg.dtype)
        if not math.isfinite(float(self.backend.xp.sum(x))):
            bad = np.argwhere(~np.isfinite(self.backend.to_numpy(x)))
            if len(bad):
                raise InputError(f"x holds non-finite values (NaN or inf), first at row {bad[0][0]}")
        return x

    def forward(self, x, dead_mask=None) -> spec.ForwardOutput:
        """x: (batch, d_in) -> ForwardOutput(x_hat, expert, router_probs, top_values,
        top_indices, losses)."""
        return spec.forward(self.params, self._check_input(x), self.cfg, self.backend, dead_mask)

    __call__ = forward

    def encode(self, x):
        """x: (batch, d_in) -> (top_values, top_indices, expert): (batch, k), (batch, k),
        (batch,) (or (batch, e) with several experts per token).  No decode, no losses."""
        enc = spec.encode(self.params, self._check_input(x), self.cfg, self.backend, keep_intermediates=False)
        experts = enc.experts[:, 0] if self.cfg.experts_per_token == 1 else enc.experts
        return enc.top_values, enc.top_indices, experts

    def decode(self, top_values, top_indices):
        """(batch, k) gated activations and global latent ids -> x_hat (batch, d_in).
        Ids from n_latents on are the shared expert's.  NumPy or native arrays."""
        top_values, top_indices = self._check_codes(top_values, top_indices)
        xp, cfg = self.backend.xp, self.cfg
        table = xp.reshape(self.params["W_dec"], (cfg.n_latents, cfg.d_in))
        if not cfg.shared_latents:
            return self.backend.decode(top_values, top_indices, table) + self.params["b_pre"]
        routed = top_indices < cfg.n_latents
        zeros, ids0 = xp.zeros_like(top_values), xp.zeros_like(top_indices)
        x_hat = self.backend.decode(xp.where(routed, top_values, zeros), xp.where(routed, top_indices, ids0), table)
        shared_ids = xp.where(routed, ids0, top_indices - cfg.n_latents)
        x_hat = x_hat + self.backend.decode(xp.where(routed, zeros, top_values), shared_ids,
                                            self.params["W_dec_shared"])
        return x_hat + self.params["b_pre"]

    def _check_codes(self, top_values, top_indices):
        """InputError unless values and ids are (batch, k) of one shape, the ids integers in
        0..total_latents-1 (no negative id wraps around to the last latents)."""
        be, total = self.backend, self.cfg.total_latents
        v_shape, i_shape = tuple(getattr(top_values, "shape", ())), tuple(getattr(top_indices, "shape", ()))
        if len(v_shape) != 2 or v_shape != i_shape:
            raise InputError(f"top_values and top_indices must both have shape (batch, k); got {v_shape} and {i_shape}")
        ids = be.asarray(top_indices)
        if "int" not in str(ids.dtype):
            raise InputError(f"top_indices must be integers; got dtype {ids.dtype}")
        if i_shape[0] * i_shape[1]:
            lo, hi = int(be.xp.min(ids)), int(be.xp.max(ids))  # two scalars, not the ids, leave a device
            if lo < 0 or hi >= total:
                raise InputError(f"top_indices must be latent ids in 0..{total - 1}; got {lo if lo < 0 else hi}")
        return be.asarray(top_values, self.cfg.dtype), ids

    def numpy_params(self) -> dict[str, np.ndarray]:
        """Parameters as NumPy arrays (bfloat16 as float32)."""
        return {name: self.backend.to_numpy(p) for name, p in self.params.items()}

    def to(self, backend) -> "SwitchSAE":
        """The same model on another backend (name or Backend)."""
        return SwitchSAE.from_params(self.cfg, self.numpy_params(), backend)

    def __repr__(self) -> str:
        c = self.cfg
        return (f"SwitchSAE(d_in={c.d_in}, n_latents={c.n_latents}, n_experts={c.n_experts}, "
                f"k={c.k}, backend={self.backend.name!r})")
