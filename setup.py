"""The wheel ships the library, not its tests: `conformance/`'s pytest files (test_*.py,
conftest.py) run from the source tree only.  Everything else is in pyproject.toml."""

from setuptools import setup
from setuptools.command.build_py import build_py


class LibraryOnly(build_py):
    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if not (m[1].startswith("test_") or m[1] == "conftest")]


setup(cmdclass={"build_py": LibraryOnly})
