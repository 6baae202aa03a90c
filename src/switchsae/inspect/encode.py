"""Sparse codes of a whole corpus: one `SwitchSAE.forward` per batch, kept as NumPy arrays."""

from __future__ import annotations

from typing import NamedTuple

import array_api_compat.numpy as xnp
import numpy as np

from switchsae.core import metrics


class Codes(NamedTuple):
    """values: (n, k) gated activations; indices: (n, k) global latent ids; expert: (n,)
    chosen expert ((n, e) with several experts per token); fvu, l0: over the corpus."""

    values: np.ndarray
    indices: np.ndarray
    expert: np.ndarray
    fvu: float
    l0: float


def encode_corpus(sae, acts: np.ndarray, batch_size: int = 4096) -> Codes:
    """Run `sae.forward` over `acts` (n, d) in batches of `batch_size` rows.  FVU as in
    `metrics.fvu`, accumulated in float64 batch by batch."""
    to_np = sae.backend.to_numpy
    mean = acts.mean(axis=0, dtype=np.float64)
    values, indices, experts, sse, variance = [], [], [], 0.0, 0.0
    for start in range(0, len(acts), batch_size):
        x = acts[start:start + batch_size]
        out = sae.forward(x)
        values.append(to_np(out.top_values).astype(np.float32))
        indices.append(to_np(out.top_indices).astype(np.int64))
        experts.append(to_np(out.expert).astype(np.int64))
        sse += float(np.sum((x - to_np(out.x_hat).astype(np.float64)) ** 2))
        variance += float(np.sum((x - mean) ** 2))
    values = np.concatenate(values)
    return Codes(values, np.concatenate(indices), np.concatenate(experts), sse / variance,
                 float(metrics.l0(xnp.asarray(values), xnp)))
