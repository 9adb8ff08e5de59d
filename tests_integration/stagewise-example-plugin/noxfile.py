"""How a plugin repository tests itself: ``nox`` installs the plugin and runs its tests."""

import os
from pathlib import Path

import nox

# stagewise's core is not on the package index yet: take it from a checkout of the stagewise
# repository, with the checkout's pins (the CPU build of torch). This copy lives in that
# repository; a plugin in its own repository runs `STAGEWISE_CHECKOUT=/path/to/stagewise nox`.
CHECKOUT = Path(os.environ.get("STAGEWISE_CHECKOUT") or Path(__file__).resolve().parents[2])
PINS = ["-c", str(CHECKOUT / "constraints.txt")] if (CHECKOUT / "constraints.txt").is_file() else []


@nox.session
def tests(session: nox.Session) -> None:
    core = CHECKOUT / "packages" / "stagewise"
    if core.is_dir():
        session.install(*PINS, "-e", str(core))
    elif "STAGEWISE_CHECKOUT" in os.environ:
        session.error(f"STAGEWISE_CHECKOUT={CHECKOUT}: no packages/stagewise there; give the stagewise checkout's root")
    else:  # once core is published, the index provides it; until then pip can only say it found none
        session.log(f"no stagewise checkout at {CHECKOUT}: stagewise comes from the package index, "
                    "where it is not yet; run STAGEWISE_CHECKOUT=/path/to/stagewise nox")
    session.install(*PINS, "-e", ".", "pytest")
    # strict: a plugin that fails to load is an error here, not a warning
    session.run("pytest", "tests", *session.posargs, env={"STAGEWISE_STRICT_PLUGINS": "1"})
