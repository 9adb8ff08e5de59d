"""What a user's ``pip install`` gets, checked from each pyproject.toml without building anything.

Every test session installs the packages editable, which reads src/ in place: a file the wheel
leaves out, a version set in two places or metadata an older build backend refuses would pass
every other test.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = sorted(ROOT.glob("packages/*/pyproject.toml"))
PROJECTS = [*PACKAGES, ROOT / "tests_integration" / "stagewise-example-plugin" / "pyproject.toml"]


def _config(pyproject: Path) -> dict:
    return tomllib.loads(pyproject.read_text(encoding="utf-8"))


def _name(pyproject: Path) -> str:
    return pyproject.parent.name


def _data_files(src: Path) -> set[Path]:
    """Every file under src/ that is not Python source (nor a build's or an install's by-product)."""
    return {file for file in src.rglob("*") if file.is_file() and file.suffix not in (".py", ".pyc")
            and not any(part == "__pycache__" or part.endswith(".egg-info") for part in file.parts)}


@pytest.mark.parametrize("pyproject", PROJECTS, ids=_name)
def test_package_data_globs_cover_every_data_file(pyproject):
    src = pyproject.parent / "src"
    globs = _config(pyproject)["tool"]["setuptools"].get("package-data", {})
    shipped = {file for package, patterns in globs.items() for pattern in patterns
               for file in (src / package.replace(".", "/")).glob(pattern)}
    assert sorted(_data_files(src) - shipped) == [], f"add these to [tool.setuptools.package-data] in {pyproject}"


@pytest.mark.parametrize("pyproject", PROJECTS, ids=_name)
def test_build_backend_accepts_the_license_expression(pyproject):
    """``license = "Apache-2.0"`` (an SPDX string, PEP 639) is a configuration error before setuptools 77."""
    config = _config(pyproject)
    assert isinstance(config["project"]["license"], str)
    (setuptools,) = [r for r in config["build-system"]["requires"] if r.startswith("setuptools")]
    minimum = re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", setuptools)
    assert minimum is not None and int(minimum[1]) >= 77, f"{pyproject}: require setuptools>=77, not {setuptools}"


@pytest.mark.parametrize("pyproject", PACKAGES, ids=_name)
def test_version_is_the_module_version(pyproject):
    """One place to bump: the wheel's version is the module's ``__version__`` (``stagewise plugins`` shows both)."""
    config = _config(pyproject)
    module = config["project"]["name"].replace("-", "_")
    assert "version" not in config["project"] and "version" in config["project"]["dynamic"]
    assert config["tool"]["setuptools"]["dynamic"]["version"] == {"attr": f"{module}.__version__"}


@pytest.mark.parametrize("pyproject", PACKAGES, ids=_name)
def test_sdist_carries_the_whole_test_suite(pyproject):
    """setuptools alone puts tests/test*.py in the sdist but not conftest.py or the golden records."""
    manifest = pyproject.parent / "MANIFEST.in"
    assert manifest.is_file() and "graft tests" in manifest.read_text(encoding="utf-8").splitlines()


def _core_minor() -> tuple[int, int]:
    init = (ROOT / "packages" / "stagewise" / "src" / "stagewise" / "__init__.py").read_text(encoding="utf-8")
    major, minor = re.search(r'^__version__ = "(\d+)\.(\d+)\.', init, re.MULTILINE).groups()
    return int(major), int(minor)


@pytest.mark.parametrize("pyproject", [p for p in PROJECTS if _name(p) != "stagewise"], ids=_name)
def test_plugin_bounds_core_to_its_minor_release(pyproject):
    """Core is 0.x: a minor release may change the hook specs, so a plugin names the one it was built on."""
    major, minor = _core_minor()
    (core,) = [r for r in _config(pyproject)["project"]["dependencies"] if re.match(r"stagewise\b(?![-_])", r)]
    assert core.replace(" ", "") == f"stagewise>={major}.{minor},<{major}.{minor + 1}", pyproject


@pytest.mark.parametrize("pyproject", PACKAGES, ids=_name)
def test_package_ships_the_typed_marker(pyproject):
    """PEP 561: a type checker reads an installed package's annotations only beside a ``py.typed``
    (the package-data test above checks the wheel carries it)."""
    module = _config(pyproject)["project"]["name"].replace("-", "_")
    assert (pyproject.parent / "src" / module / "py.typed").is_file(), f"add an empty src/{module}/py.typed"
