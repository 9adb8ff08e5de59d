"""Per-package test sessions, integration, docs, lint, demo and benchmarks.

Each package gets its own session and virtualenv holding core plus that package only, so a
plugin proves it works alone. ``nox`` with no arguments runs every test session; ``nox -l``
lists them. Third-party versions come from constraints.txt.
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

ROOT = Path(__file__).parent
PACKAGES = sorted(p.parent.name for p in ROOT.glob("packages/*/pyproject.toml"))
PLUGINS = [p for p in PACKAGES if p != "stagewise"]
CONSTRAINTS = ("-c", str(ROOT / "constraints.txt"))
STRICT = {"STAGEWISE_STRICT_PLUGINS": "1"}

nox.options.sessions = [f"tests-{p}" for p in PACKAGES] + ["integration", "docs", "lint"]
nox.options.default_venv_backend = "venv"


def _install(session: nox.Session, *packages: str, extras: str = "") -> None:
    editable = [arg for p in packages for arg in ("-e", f"packages/{p}{extras if p == 'stagewise' else ''}")]
    session.install(*CONSTRAINTS, "pytest", "pytest-xdist", *editable)


def _workers() -> tuple[str, ...]:
    """pytest-xdist's options: a test process per core free to nox, at most 4 (the longest test files
    then set the pace), each taking whole files, so that a file's module fixtures run once. The session's
    arguments come after these: ``nox -s tests-stagewise -- -n 0`` runs the tests in one process."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return ("-n", str(min(cores, 4)) if cores > 1 else "0", "--dist", "loadfile")


def _package_session(package: str) -> None:
    @nox.session(name=f"tests-{package}", tags=["tests"])
    def tests(session: nox.Session) -> None:
        """Core plus this one package, in its own virtualenv."""
        # core's own session also installs its extras, so plots and TensorBoard are tested
        _install(session, *dict.fromkeys(["stagewise", package]),
                 extras="[plots,tensorboard]" if package == "stagewise" else "")
        session.run("pytest", f"packages/{package}/tests", *_workers(), *session.posargs, env=STRICT)


for _package in PACKAGES:
    _package_session(_package)


@nox.session(tags=["tests"])
def integration(session: nox.Session) -> None:
    """Every package together, plus the example third-party plugin in tests_integration/."""
    _install(session, *PACKAGES)
    session.install(*CONSTRAINTS, "-e", "tests_integration/stagewise-example-plugin")
    session.run("pytest", "tests_integration", *_workers(), *session.posargs, env=STRICT)


@nox.session(tags=["tests"])
def docs(session: nox.Session) -> None:
    """Every hook spec, recipe key and CLI command is documented in docs/, and every Python example runs."""
    _install(session, *PACKAGES)
    # the example plugin's README holds an example too
    session.install(*CONSTRAINTS, "-e", "tests_integration/stagewise-example-plugin")
    session.run("pytest", "docs/test_docs.py", "docs/test_examples.py", *session.posargs, env=STRICT)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the whole tree; mypy over core and every plugin (mypy.ini), against core's dependencies and extras."""
    plugins = [arg for p in [*(f"packages/{p}" for p in PLUGINS), "tests_integration/stagewise-example-plugin"]
               for arg in ("-e", p)]
    session.install(*CONSTRAINTS, "ruff", "mypy", "-e", "packages/stagewise[plots,tensorboard]", *plugins)
    session.run("ruff", "check", ".")
    session.run("mypy")


@nox.session
def demo(session: nox.Session) -> None:
    """Run the core demo recipe (about a minute on 2 CPU cores)."""
    _install(session, "stagewise")
    session.run("stagewise", "run", "demo", *session.posargs, env=STRICT)


@nox.session
def bench(session: nox.Session) -> None:
    """Every package's benchmarks that run without external data (e.g. core's parity)."""
    _install(session, *PACKAGES)
    session.run("python", "packages/stagewise/bench/parity.py", *session.posargs, env=STRICT)
