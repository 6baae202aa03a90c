"""The spec runs unmodified on array-api-strict (nothing NumPy-specific leaked into core/)
and gives the NumPy reference's numbers."""

import array_api_strict as xps
import numpy as np
import pytest

from switchsae.backends import load_backend
from switchsae.core.backend import Backend
from switchsae.core.spec import forward

from switchsae.conformance.cases import CASE_NAMES, build


class StrictBackend(Backend):
    """Only the standard: every hook left at its core/ default."""

    name = "array-api-strict"
    xp = xps
    dtypes = ("float32", "float64")

    def asarray(self, a, dtype=None):
        a = xps.asarray(np.asarray(a))
        return a if dtype is None else xps.astype(a, getattr(xps, dtype))

    def to_numpy(self, a):
        return np.asarray(a._array) if hasattr(a, "_array") else np.asarray(a)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_spec_on_array_api_strict_equals_numpy(name):
    case = build(name)
    strict = StrictBackend()
    params = {n: strict.asarray(p, "float64") for n, p in case.params.items()}
    dead = None if case.dead_mask is None else strict.asarray(case.dead_mask)
    bias = None if case.select_bias is None else strict.asarray(case.select_bias, "float64")
    got = forward(params, strict.asarray(case.x, "float64"), case.cfg, strict, dead, bias)
    ref = forward(case.params, case.x, case.cfg, load_backend("numpy"), case.dead_mask, case.select_bias)
    np.testing.assert_allclose(strict.to_numpy(got.x_hat), ref.x_hat, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(strict.to_numpy(got.expert), ref.expert)
    np.testing.assert_array_equal(strict.to_numpy(got.top_indices), ref.top_indices)
    for term in ref.losses:
        np.testing.assert_allclose(float(got.losses[term]), float(ref.losses[term]), rtol=1e-12)
