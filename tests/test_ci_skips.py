"""conftest.py's rule: in CI ($CI set) a test that skips for a missing backend or tool fails,
in a test (a failure) and at collection (an error, which stops the session); outside CI it
skips; an xfail stays an xfail.  Runs an inner
pytest session (pytester) under the project's own conftest."""

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT_CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"
MODULES = {
    "test_missing_module": "import pytest\npytest.importorskip('no_such_module_for_switchsae')\n"
                           "def test_never(): pass\n",
    "test_missing_tool": "import pytest\ndef test_tool(): pytest.skip('tool not found')\n"
                         "@pytest.mark.xfail(strict=True)\ndef test_known_bug(): assert False\n"
                         "def test_plain(): pass\n",
}


@pytest.mark.parametrize("ci, failed, errors, skipped", [("true", 1, 1, 0), ("", 0, 0, 2)])
def test_a_skip_fails_in_ci_only(pytester, monkeypatch, ci, failed, errors, skipped):
    monkeypatch.setenv("CI", ci)
    pytester.makeconftest(ROOT_CONFTEST.read_text())
    pytester.makepyfile(**MODULES)
    result = pytester.runpytest_inprocess("-p", "no:xdist", "-p", "no:cacheprovider",
                                         "--continue-on-collection-errors")
    result.assert_outcomes(passed=1, failed=failed, skipped=skipped, xfailed=1, errors=errors)
    if ci:
        result.stdout.fnmatch_lines(["*skipped in CI, where every backend and tool must be installed*"])
