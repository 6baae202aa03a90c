"""Backend-generic tests run over every backend (SciPy's `xp` fixture is the model).

A test that takes `backend_name` (the name) or `backend` (the loaded object) runs once per
backend under test: $SWITCHSAE_CONFORMANCE_BACKENDS, comma-separated names or "all" (every
registered backend: what CI uses, so a backend that is missing there FAILS, never skips), else
every installed backend.  A test that also takes `dtype` runs per (backend, dtype): float32
everywhere, bfloat16 where required (`REQUIRED_DTYPES`).  Used by conformance/ and tests/."""

from __future__ import annotations

import os

import pytest

from switchsae.backends import REGISTRY, installed_backends

# Every backend must run float32; bfloat16 is required of the accelerator frameworks.
# NumPy has no bfloat16 type, so the reference backend is checked in float32 only.
REQUIRED_DTYPES = {"numpy": ("float32",)}


def backends_under_test() -> list[str]:
    named = os.environ.get("SWITCHSAE_CONFORMANCE_BACKENDS", "")
    if named.strip() == "all":
        return list(REGISTRY)
    return [b.strip() for b in named.split(",") if b.strip()] or installed_backends()


def pytest_generate_tests(metafunc):
    wanted = {"backend", "backend_name"} & set(metafunc.fixturenames)
    if not wanted or any(m.name == "parametrize" and "backend" in str(m.args[0])
                         for m in metafunc.definition.iter_markers()):
        return
    names = backends_under_test()
    if "dtype" in metafunc.fixturenames:
        pairs = [(b, dt) for b in names for dt in REQUIRED_DTYPES.get(b, ("float32", "bfloat16"))]
        metafunc.parametrize(("backend_name", "dtype"), pairs)
    else:
        metafunc.parametrize("backend_name", names)


@pytest.fixture
def backend(backend_name):
    """The backend object; a backend that cannot load FAILS the test (never skips)."""
    from switchsae.backends import load_backend

    assert backend_name in REGISTRY, f"unknown backend {backend_name!r}"
    return load_backend(backend_name)


@pytest.fixture(autouse=True)
def _dtype_supported(request):
    if "dtype" in request.fixturenames and "backend_name" in request.fixturenames:
        backend, dtype = request.getfixturevalue("backend"), request.getfixturevalue("dtype")
        assert dtype in backend.dtypes, f"backend {backend.name} must support {dtype}"
