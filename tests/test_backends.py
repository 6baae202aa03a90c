"""Tests every backend must pass, run once per backend by the root conftest's `backend`
fixture (SWITCHSAE_CONFORMANCE_BACKENDS=all: a missing backend fails)."""

from __future__ import annotations

import array_api_compat.numpy as np_xp
import numpy as np

from switchsae.core.topk import topk_reference


def test_topk_breaks_ties_like_the_spec(backend):
    """Largest first, the lower index first on ties, exactly, on post-ReLU rows: tie-heavy
    (small integers, zeros, all-zero rows), narrow ones and rows >= 16 k wide (torch's bounded
    CPU path)."""
    rng = np.random.default_rng(4)
    for trial in range(60):
        k = int(rng.integers(1, 6))
        wide = trial % 2
        n = int(rng.integers(16 * (k + 1), 40 * (k + 1))) if wide else int(rng.integers(k, 14))
        acts = rng.integers(0, 5, size=(int(rng.integers(1, 12)), n)).astype(np.float32)  # relu'd
        acts *= rng.integers(0, 2, size=(acts.shape[0], 1))  # some all-zero rows
        values, indices = backend.topk(backend.asarray(acts), k)
        want_v, want_i = topk_reference(acts, k, np_xp)
        np.testing.assert_array_equal(backend.to_numpy(indices), want_i, err_msg=f"k={k}, n={n}")
        np.testing.assert_array_equal(backend.to_numpy(values), want_v, err_msg=f"k={k}, n={n}")
