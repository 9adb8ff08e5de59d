"""The pip command that installs a stagewise package or extra, for the hints errors give.

The packages are not on the package index yet: when core runs from a checkout (installed with
``-e``), the command installs from that checkout's ``packages/`` folder, with its pins.
"""

from __future__ import annotations

import shlex
from pathlib import Path

# The packages/ folder of the checkout core runs from, when it is installed from one (-e): the
# packages are not on the package index yet, so a hint names the checkout's folder instead.
CHECKOUT_PACKAGES = Path(__file__).resolve().parents[3]


def install_command(distribution: str, extra: str = "") -> str:
    """The pip command that installs ``distribution`` (with its ``extra``): from the checkout core
    runs from when that holds it, else from the package index."""
    folder = CHECKOUT_PACKAGES / distribution
    wanted = f"[{extra}]" if extra else ""
    if not (folder / "pyproject.toml").is_file():
        return f"pip install {shlex.quote(distribution + wanted)}"
    pins = CHECKOUT_PACKAGES.parent / "constraints.txt"
    pinned = f"-c {shlex.quote(str(pins))} " if pins.is_file() else ""
    return f"pip install {pinned}-e {shlex.quote(str(folder) + wanted)}"
