"""``stagewise cache``: what the cache of tokenised text files (:mod:`stagewise.data.textcache`) holds, and
removing its entries."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from stagewise.errors import StagewiseError

if TYPE_CHECKING:  # imported where used: the cache module imports numpy, which other commands do without
    from stagewise.data.textcache import StoredEntry

STALE = ("an entry is stale, and no load uses it, when its text file is gone or has changed, when another version "
         "of stagewise made it, or when its header cannot be read; the unfinished write of an entry that a killed "
         "process left (its temp file, unchanged for an hour) counts as a stale entry")


def add_cache_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="show what the cache of tokenised text files holds; list or clear it",
                       description="The cache of tokenised text files (data.cache): an entry holds the token ids "
                       "of one text file of 1 MB or more, tokenised with one set of options (lowercase, encoding, "
                       "text_field, max_tokens), for later loads of the file to read back. With no ACTION, prints "
                       "the cache's folder ($STAGEWISE_CACHE_DIR/text, else $XDG_CACHE_HOME/stagewise/text, else "
                       f"~/.cache/stagewise/text), its entries' number and size, and those of the stale ones: {STALE}.")
    p.set_defaults(handler=cmd_cache)
    actions = p.add_subparsers(dest="action", metavar="[ACTION]")  # none: what cmd_cache prints
    a = actions.add_parser("list", help="one line per entry: usable or stale, its size, tokens and text file",
                           description="One line per entry: 'usable' or 'stale', its size, its number of tokens, "
                           "the text file it was made from and the options it was tokenised with, and why a stale "
                           f"one is stale. Only the entries' headers are read; {STALE}.")
    a.set_defaults(handler=cmd_cache_list)
    a = actions.add_parser("clear", help="remove every entry, or only the stale ones",
                           description="Remove the cache's entries, one line each (as 'list' shows it), then the "
                           "space freed. Only entries are removed, the files in the cache's text/ folder with an "
                           "entry's name (32 hex digits, .ids), and the temp files of entries that a killed process "
                           "left (.NAME.ids.*.tmp, unchanged for an hour): any other file there or in the cache's "
                           "folder stays.")
    a.add_argument("--stale", action="store_true", help=f"remove only the stale entries: {STALE}")
    a.set_defaults(handler=cmd_cache_clear)


def cmd_cache(args: argparse.Namespace) -> int:
    folder, entries = _entries()
    if not entries:
        return _none_in(folder)
    stale = [entry for entry in entries if entry.stale]
    print(f"folder:  {folder}")
    print(f"entries: {len(entries)}, {_total(entries)}")
    print(f"stale:   {len(stale)}" + (f", {_total(stale)} (to remove: stagewise cache clear --stale)" if stale else ""))
    return 0


def cmd_cache_list(args: argparse.Namespace) -> int:
    folder, entries = _entries()
    if not entries:
        return _none_in(folder)
    for line in _lines(entries):
        print(line)
    return 0


def cmd_cache_clear(args: argparse.Namespace) -> int:
    folder, entries = _entries()
    if not entries:
        return _none_in(folder)
    removed = [entry for entry in entries if entry.stale or not args.stale]
    kept = f"kept {_entries_word(len(entries) - len(removed), 'usable ')}"
    if not removed:
        print(f"no stale entries in {folder}; {kept}")
        return 0
    for entry, line in zip(removed, _lines(removed), strict=True):
        entry.path.unlink(missing_ok=True)  # another clear may have removed it first
        print(f"removed {line}")  # as it goes: the lines so far stay true if the next removal fails
    print(f"freed {_total(removed)}: removed {_entries_word(len(removed))} from {folder}"
          + (f"; {kept}" if len(removed) < len(entries) else ""))
    return 0


def size_text(n: int) -> str:
    """``n`` bytes in decimal units, as disks and file managers count them: 12.3 kB, 1.5 GB."""
    if n < 1000:
        return f"{n} bytes"
    size = float(n)
    for unit in ("kB", "MB"):
        size /= 1000
        if round(size, 1) < 1000:
            return f"{size:.1f} {unit}"
    return f"{size / 1000:.1f} GB"


def _entries() -> tuple[Path, list[StoredEntry]]:
    """The cache's entries folder and its entries, by text file (those whose header cannot be read last)."""
    from stagewise.data.textcache import entries_folder, stored_entries

    try:
        folder = entries_folder()
    except RuntimeError as exc:  # no home folder (a container's user may have none)
        raise StagewiseError(f"cannot find the cache folder ({exc}); set STAGEWISE_CACHE_DIR to the folder "
                             f"that holds it") from None
    return folder, sorted(stored_entries(folder), key=lambda e: (e.file is None, e.file or "", str(e.path)))


def _none_in(folder: Path) -> int:
    print(f"no cached token ids in {folder}")
    return 0


def _lines(entries: list[StoredEntry]) -> list[str]:
    """One line per entry, in columns: usable or stale, size, tokens, text file and options, why it is stale."""
    sizes = [size_text(entry.size) for entry in entries]
    tokens = [f"{entry.tokens:,}" if isinstance(entry.tokens, int) else "?" for entry in entries]
    width, digits = max(map(len, sizes)), max(map(len, tokens))
    return [f"{'stale' if entry.stale else 'usable':<6}  {size:>{width}}  {count:>{digits}} tokens  "
            f"{entry.file or entry.path}{_options(entry.options)}" + (f": {entry.stale}" if entry.stale else "")
            for entry, size, count in zip(entries, sizes, tokens, strict=True)]


def _options(options: object) -> str:
    """The options an entry's file was tokenised with, as ``(lowercase=true, encoding=utf-8)`` (unset ones left
    out); nothing for a header without them."""
    if not isinstance(options, dict):
        return ""
    shown = [f"{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in options.items()
             if value is not None]
    return f" ({', '.join(shown)})"


def _total(entries: list[StoredEntry]) -> str:
    return size_text(sum(entry.size for entry in entries))


def _entries_word(n: int, kind: str = "") -> str:
    return f"{n} {kind}{'entry' if n == 1 else 'entries'}"
