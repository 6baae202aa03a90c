"""Parametrise the conformance suite over backends.

Backends under test: $SWITCHSAE_CONFORMANCE_BACKENDS, comma-separated names or "all" (every
registered backend: what CI uses, so a backend that is missing there fails), else every
installed backend.  Dtypes: float32 and bfloat16 where
the backend supports it."""

from __future__ import annotations

import os

import pytest

from switchsae.backends import REGISTRY, installed_backends


def backends_under_test() -> list[str]:
    named = os.environ.get("SWITCHSAE_CONFORMANCE_BACKENDS", "")
    if named.strip() == "all":
        return list(REGISTRY)
    return [b.strip() for b in named.split(",") if b.strip()] or installed_backends()


# Every backend must run float32; bfloat16 is required of the accelerator frameworks.
# NumPy has no bfloat16 type, so the reference backend is checked in float32 only.
REQUIRED_DTYPES = {"numpy": ("float32",)}


def pytest_generate_tests(metafunc):
    names = backends_under_test()
    if "dtype" in metafunc.fixturenames:
        pairs = [(b, dt) for b in names for dt in REQUIRED_DTYPES.get(b, ("float32", "bfloat16"))]
        metafunc.parametrize(("backend_name", "dtype"), pairs)
    elif "backend_name" in metafunc.fixturenames:
        metafunc.parametrize("backend_name", names)


@pytest.fixture
def backend(backend_name):
    """The backend object; a backend that cannot load FAILS the test (never skips)."""
    from switchsae.backends import load_backend

    assert backend_name in REGISTRY, f"unknown backend {backend_name!r}"
    backend = load_backend(backend_name)
    return backend


@pytest.fixture(autouse=True)
def _dtype_supported(request):
    if "dtype" in request.fixturenames:
        backend, dtype = request.getfixturevalue("backend"), request.getfixturevalue("dtype")
        assert dtype in backend.dtypes, f"backend {backend.name} must support {dtype}"
