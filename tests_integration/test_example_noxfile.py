"""The example plugin's noxfile, the one plugin authors copy, run against a stand-in for nox."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

NOXFILE = Path(__file__).resolve().parent / "stagewise-example-plugin" / "noxfile.py"


class Session:
    """Records what a nox session asked for; ``error`` stops it, as nox's does."""

    def __init__(self):
        self.installs, self.logs, self.posargs = [], [], []

    def install(self, *args):
        self.installs.append(args)

    def log(self, message):
        self.logs.append(message)

    def error(self, message):
        raise RuntimeError(message)

    def run(self, *args, env=None):
        pass


def run_tests_session(monkeypatch, checkout: Path | None, noxfile: Path = NOXFILE) -> Session:
    monkeypatch.setitem(sys.modules, "nox", types.SimpleNamespace(session=lambda f: f, Session=Session))
    if checkout is None:
        monkeypatch.delenv("STAGEWISE_CHECKOUT", raising=False)
    else:
        monkeypatch.setenv("STAGEWISE_CHECKOUT", str(checkout))
    spec = importlib.util.spec_from_file_location("example_noxfile", noxfile)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    session = Session()
    module.tests(session)
    return session


def test_a_checkout_installs_core_from_it(monkeypatch):
    session = run_tests_session(monkeypatch, NOXFILE.parents[2])
    assert "-e" in session.installs[0] and str(NOXFILE.parents[2] / "packages" / "stagewise") in session.installs[0]


def test_a_wrong_checkout_is_refused_naming_it(monkeypatch, tmp_path):
    # was: core was skipped and pip said only "No matching distribution found for stagewise<0.2,>=0.1"
    with pytest.raises(RuntimeError, match=f"STAGEWISE_CHECKOUT={tmp_path}: no packages/stagewise there"):
        run_tests_session(monkeypatch, tmp_path)


def test_a_copy_outside_a_checkout_says_where_core_comes_from(monkeypatch, tmp_path):
    copy = tmp_path / "a" / "b" / "stagewise-mine" / "noxfile.py"  # its parents[2] holds no checkout
    copy.parent.mkdir(parents=True)
    copy.write_text(NOXFILE.read_text(encoding="utf-8"), encoding="utf-8")
    session = run_tests_session(monkeypatch, None, copy)
    assert session.installs == [("-e", ".", "pytest")]  # no core: pip looks for it on the index
    assert any("STAGEWISE_CHECKOUT=/path/to/stagewise" in message for message in session.logs), session.logs
