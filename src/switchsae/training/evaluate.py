"""Evaluate a Switch SAE on activation data: reconstruction, sparsity, routing, feature density."""

from __future__ import annotations

from dataclasses import dataclass

import array_api_compat.numpy as np_xp
import numpy as np

from switchsae.core import metrics
from switchsae.core.config import check_int
from switchsae.core.dead_latents import update_tokens_since_fired
from switchsae.data import DataError


@dataclass
class EvalResult:
    """tokens: rows evaluated.  fvu, nmse, l0: token-weighted means of the per-batch metrics.
    dead_fraction: latents that never fired on these tokens; dense_fraction: latents firing on
    more than 10% of them.  expert_load: fraction of tokens per expert; load_entropy in nats
    (log N when balanced).  firing_frequency: (M,) fraction of tokens on which each latent
    fired."""

    tokens: int
    fvu: float
    nmse: float
    l0: float
    dead_fraction: float
    dense_fraction: float
    expert_load: list
    load_entropy: float
    firing_frequency: np.ndarray

    def summary(self) -> dict:
        """The scalar metrics and the expert load as a JSON-able dict."""
        return {"tokens": self.tokens, "fvu": self.fvu, "nmse": self.nmse, "l0": self.l0,
                "dead_fraction": self.dead_fraction, "dense_fraction": self.dense_fraction,
                "expert_load": self.expert_load,
                "load_entropy": self.load_entropy}

    def format(self) -> str:
        """Human-readable lines."""
        n = len(self.expert_load)
        load = " ".join(f"{v:.3f}" for v in self.expert_load)
        return "\n".join([
            f"tokens evaluated   {self.tokens}",
            f"FVU                {self.fvu:.4f}",
            f"normalised MSE     {self.nmse:.4f}",
            f"L0                 {self.l0:.2f}",
            f"dead fraction      {self.dead_fraction:.4f}  (never fired on these tokens)",
            f"dense fraction     {self.dense_fraction:.4f}  (fired on more than 10% of them)",
            f"expert load        {load}",
            f"load entropy       {self.load_entropy:.4f} nats  (max log {n} = {np.log(n):.4f})",
        ])


def evaluate(sae, source, max_tokens: int | None = None) -> EvalResult:
    """Run `sae` over one epoch of `source` (at most `max_tokens` rows, at least 2: FVU needs a
    variance) without training.  No batch is a single row: a batch that would leave one row
    for last hands its own last row on to it."""
    be, cfg = sae.backend, sae.cfg
    xp = be.xp
    if max_tokens is not None:
        check_int("max_tokens", max_tokens, 2)
    total = source.n_rows if max_tokens is None else min(max_tokens, source.n_rows)
    if total < 2:
        raise DataError(f"cannot evaluate on {total} token(s): FVU needs at least 2 (a variance)")
    seen, sums = 0, {"fvu": 0.0, "nmse": 0.0, "l0": 0.0}
    counter = be.asarray(np.zeros(cfg.total_latents, dtype=np.float32))
    fires = be.asarray(np.zeros(cfg.total_latents, dtype=np.float32))
    load = np.zeros(cfg.n_experts)
    carried = None  # the row a batch handed on
    while seen < total:
        batch = source.next_batch()
        batch = (batch if carried is None else np.concatenate([carried, batch]))[: total - seen]
        carried = batch[-1:] if total - seen - len(batch) == 1 else None
        batch = batch if carried is None else batch[:-1]
        _check_batch(batch, seen)
        x = be.asarray(batch, "float32")
        out = sae.forward(x)
        x_hat = xp.astype(out.x_hat, xp.float32)
        rows = batch.shape[0]
        sums["fvu"] += rows * float(metrics.fvu(x, x_hat, xp))
        sums["nmse"] += rows * float(metrics.normalized_mse(x, x_hat, xp))
        sums["l0"] += rows * float(metrics.l0(out.top_values, xp))
        load += rows * be.to_numpy(metrics.expert_load(out.expert, cfg.n_experts, xp))
        counter = update_tokens_since_fired(counter, out.top_indices, out.top_values, be)
        fired = xp.astype(xp.reshape(out.top_values, (-1,)) != 0, xp.float32)
        fires = be.scatter_add(fires, xp.reshape(out.top_indices, (-1,)), fired)
        seen += rows
    load /= seen
    frequency = be.to_numpy(fires) / seen
    return EvalResult(
        tokens=seen, fvu=sums["fvu"] / seen, nmse=sums["nmse"] / seen, l0=sums["l0"] / seen,
        dead_fraction=float(metrics.dead_fraction(counter, seen, xp)),
        dense_fraction=float(metrics.dense_fraction(frequency, np_xp)),
        expert_load=[float(v) for v in load],
        load_entropy=float(metrics.load_entropy(load, np_xp)),
        firing_frequency=frequency,
    )


def _check_batch(batch: np.ndarray, seen: int) -> None:
    """DataError for activations the metrics are undefined on: NaN/inf, or a constant batch
    (zero variance: FVU divides by 0).  seen: rows evaluated before this batch."""
    finite = np.isfinite(batch)
    if not finite.all():
        row, col = np.argwhere(~finite)[0]
        raise DataError(f"the activations hold NaN/inf (row {seen + row}, column {col}); cannot evaluate")
    if len(batch) > 1 and not np.any(batch != batch[:1]):
        raise DataError(f"the activations are constant (rows {seen}..{seen + len(batch) - 1} all equal): "
                        "FVU is undefined with zero variance")
