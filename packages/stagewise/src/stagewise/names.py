"""Names a recipe gives files and folders (the run folder, checkpoints, TensorBoard folders), kept
one file each and valid on every file system a run directory is copied to.

Linux compares names byte for byte. macOS and Windows ignore case (``Train`` is ``train``);
macOS also ignores Unicode normalisation ("é" as one code point, NFC, or as "e" and a combining
accent, NFD, as some macOS tools write it). Windows refuses some characters, a trailing dot or
space, and device names such as ``CON`` and ``NUL``, with any extension (``nul.pt``).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

WINDOWS_CHARACTERS = '<>:"|?*'  # besides '/', '\' and the control characters
WINDOWS_DEVICES = frozenset(["CON", "PRN", "AUX", "NUL",
                             *(f"{port}{n}" for port in ("COM", "LPT") for n in "0123456789¹²³")])


def same_file_key(name: str) -> str:
    """What names that are one file where case and Unicode normalisation are ignored have in common."""
    return unicodedata.normalize("NFD", unicodedata.normalize("NFD", name).casefold())


def alike(names: Iterable[str]) -> list[list[str]]:
    """The groups of ``names`` (each spelling once, in order) that are one file on macOS or Windows."""
    groups: dict[str, list[str]] = {}
    for name in dict.fromkeys(names):
        groups.setdefault(same_file_key(name), []).append(name)
    return [spellings for spellings in groups.values() if len(spellings) > 1]


def how_alike(spellings: list[str], thing: str = "file") -> str:
    """Why ``spellings`` (a group :func:`alike` found) are one ``thing``, and where."""
    if len({unicodedata.normalize("NFC", s) for s in spellings}) == 1:
        return f"are one name in two Unicode normalisations (NFC and NFD), so they are one {thing} on macOS"
    if len({s.casefold() for s in spellings}) == 1:
        return f"differ only in case, so they are one {thing} where case is ignored (macOS, Windows)"
    return f"differ only in case and Unicode normalisation, so they are one {thing} on macOS"


def windows_problem(name: str) -> str | None:
    """Why Windows cannot hold a file or folder named ``name``, with what to write instead; None when it can."""
    bad = sorted({c for c in name if c in WINDOWS_CHARACTERS or ord(c) < 32})
    if bad:
        return (f"{' '.join(map(repr, bad))} cannot be in a file name on Windows; write e.g. "
                f"{''.join('-' if c in bad else c for c in name)!r}")
    if name.endswith((".", " ")):
        return f"Windows drops a trailing dot or space from a file name; write e.g. {name.rstrip('. ')!r}"
    stem = name.split(".")[0].rstrip(" ")
    if stem.upper() in WINDOWS_DEVICES:
        return (f"{stem!r} is a device name on Windows (CON, PRN, AUX, NUL, COM0-9, LPT0-9), with any extension "
                f"and in any case; write e.g. {name.replace(stem, stem + '_', 1)!r}")
    return None
