"""How a plugin repository tests itself: ``nox`` installs the plugin and runs its tests."""

from pathlib import Path

import nox

# This copy lives in the stagewise repository, whose core is not on the package index: take it
# from the checkout, with the checkout's pins (the CPU build of torch). A plugin in its own
# repository has no such folder, and pip installs stagewise from the index as a dependency.
CHECKOUT = Path(__file__).resolve().parents[2]
PINS = ["-c", str(CHECKOUT / "constraints.txt")] if (CHECKOUT / "constraints.txt").is_file() else []


@nox.session
def tests(session: nox.Session) -> None:
    core = CHECKOUT / "packages" / "stagewise"
    if core.is_dir():
        session.install(*PINS, "-e", str(core))
    session.install(*PINS, "-e", ".", "pytest")
    # strict: a plugin that fails to load is an error here, not a warning
    session.run("pytest", "tests", *session.posargs, env={"STAGEWISE_STRICT_PLUGINS": "1"})
