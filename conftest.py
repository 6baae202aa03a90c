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


# -- in CI nothing skips ---------------------------------------------------------------------------
# Outside CI a test whose backend or tool is missing skips (`pytest.importorskip`, `pytest.skip`).
# In CI ($CI set: `.ci/run` sets it) everything is installed, so such a skip is a FAILURE, at
# collection (a module-level importorskip) as in a test; an xfail stays an xfail.
def _failed_in_ci(report) -> None:
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where every backend and tool must be installed: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    _failed_in_ci((yield).get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    _failed_in_ci((yield).get_result())


# -- the whole suite on every CPU (pytest-xdist) --------------------------------------------------
# `pytest` with no paths (the README's command, CI) runs one worker per CPU this process may use
# (os.sched_getaffinity: a `taskset` or a container's cpuset counts), a whole file per worker
# (--dist loadfile), so each file's module fixtures run once; one CPU, a path or test named on
# the command line, or an explicit -n runs as given (in-process unless -n asks otherwise).  Most
# of the suite is single-threaded compiling (XLA, torch.compile) and subprocesses that wait on
# each other, so a second worker roughly halves the time.  The files that hold minutes of work
# go first, so no worker is left with a long one when the other has finished.
LONG_FILES = ("tests/test_gpu_proof.py", "conformance/test_conformance.py", "tests/test_parallel_cli.py",
              "tests/test_jax_lazy.py", "conformance/test_properties.py", "tests/test_jax_backend.py",
              "tests/test_jax_sharding.py", "tests/test_jax_auxk.py")


def _workers() -> int:
    """$PYTEST_XDIST_AUTO_NUM_WORKERS (xdist's own override for -n auto), else the CPUs."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS", "").strip().isdigit():
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    whole_suite = config.args_source == pytest.Config.ArgsSource.TESTPATHS
    if (hasattr(config, "workerinput") or not config.pluginmanager.hasplugin("xdist") or not whole_suite
            or config.option.numprocesses is not None or config.option.dist != "no"
            or config.getoption("usepdb") or config.option.collectonly):
        return
    workers = _workers()
    if workers < 2:
        return
    config.option.numprocesses = workers
    config.option.tx = ["popen"] * workers
    config.option.dist = "loadfile"
    config.option.loadscopereorder = False  # keep LONG_FILES first (pytest_collection_modifyitems)


def pytest_collection_modifyitems(config, items):
    if hasattr(config, "workerinput"):  # the workers' order is the order files are handed out
        rank = {name: i for i, name in enumerate(LONG_FILES)}
        items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
