"""Tokenised text files kept between runs, so that a big corpus is tokenised once, not by every run.

Tokenising takes about 1 s per 25 MB of text; reading a file's cached ids back, about 1 s per
GB of ids (0.23 GB for a 311 MB text). An entry holds one file's tokens as ids of the file's own
words (int32) and those words in id order, so that a file's entry serves every source it is part
of and every option that does not change its tokens (``seq_len``, ``min_freq``, ``max_vocab``,
``splits``): the loader maps them to the ids of the whole source as it does a file it has just tokenised.

An entry is one file of three ``numpy.save`` arrays, read back with ``allow_pickle=False``: a JSON
header (what the ids were made from, their count and CRC-32), the words (UTF-8, one a line: a word
holds no whitespace) and the ids. Its name is a hash of the file's path and the options that decide
its tokens, so a changed file's entry is replaced, not joined by another. An entry whose header names
another file version, stagewise version or format is not used; one that cannot be read, or whose
contents fail the checksum, is a warning and the file is tokenised again, never an error or wrong ids.

The cache lives in ``$STAGEWISE_CACHE_DIR``, else ``$XDG_CACHE_HOME/stagewise``, else
``~/.cache/stagewise``; entries are in its ``text/`` folder, and may be deleted at any time.
``stagewise cache`` shows them (:func:`stored_entries`: judged by their headers alone, as a load
judges them, :func:`why_stale`) and removes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG
from typing import Any, BinaryIO

import numpy as np

from stagewise import __version__
from stagewise.engine.atomic import atomic_write_bytes

FORMAT = "stagewise-text-ids-1"  # bump when an entry's layout or the tokenisation changes
MIN_BYTES = 1 << 20  # a smaller file tokenises in ~50 ms: an entry would save less than it costs
KEEP_FREE = 2 << 30  # bytes an entry must leave free on its disk: a run's checkpoints need room more
ENTRY_NAME = re.compile(r"[0-9a-f]{32}\.ids")  # an entry's file name in the text/ folder (TextCache.entry)
ENTRY_TEMP = re.compile(r"\.[0-9a-f]{32}\.ids\.\w+\.tmp")  # atomic_write_bytes's temp file of an entry
# seconds a temp file of an entry lies unchanged before it counts as a killed writer's: a write takes seconds, and
# any other end of it (an error, Ctrl-C, SIGTERM) removes its temp file; SIGKILL or a power cut leaves it
ABANDONED_AFTER = 3600


@dataclass
class FileTokens:
    """One file's tokens: ``ids`` (N,) int32, ids of ``words`` (id i is ``words[i]``, in order of first sighting)."""

    ids: np.ndarray
    words: list[str]


def cache_folder() -> Path:
    """Where stagewise keeps what it can rebuild: ``$STAGEWISE_CACHE_DIR``, else ``$XDG_CACHE_HOME/stagewise``,
    else ``~/.cache/stagewise``."""
    folder = os.environ.get("STAGEWISE_CACHE_DIR")
    if folder:
        return Path(folder).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stagewise"


def entries_folder() -> Path:
    """The folder of the cache's entries (it may not exist yet)."""
    return cache_folder() / "text"


class TextCache:
    """The cache entries of the files one source's load tokenises with ``options`` (what decides a file's
    tokens besides the file: lowercasing, encoding, ...). Files under :data:`MIN_BYTES` have none."""

    def __init__(self, options: dict[str, Any]):
        self.options = options
        # under torchrun every process tokenises; one a machine writes (all would write the same bytes)
        self.writes = os.environ.get("LOCAL_RANK", "0") == "0"
        try:
            self.folder: Path | None = entries_folder()
        except RuntimeError as exc:  # no home folder (a container's user may have none): the run goes on uncached
            self.folder = None
            warnings.warn(f"stagewise: not caching token ids ({exc}); set STAGEWISE_CACHE_DIR to a folder, or "
                          f"data.cache = false", stacklevel=3)

    def entry(self, file: Path) -> CacheEntry | None:
        """``file``'s entry, its version taken now (before it is read); None for a small file."""
        stat = file.stat()
        if stat.st_size < MIN_BYTES or self.folder is None:
            return None
        path = file.resolve()
        name = hashlib.sha256(json.dumps([FORMAT, str(path), self.options], sort_keys=True).encode()).hexdigest()
        return CacheEntry(self, self.folder / f"{name[:32]}.ids", identity(path, self.options, stat))


def identity(path: Path, options: Any, stat: os.stat_result | None) -> dict[str, Any]:
    """What an entry's header must say for a load of the file at ``path`` (resolved; ``stat``, its stat now:
    None where it is gone) with ``options`` to use the entry."""
    # size and mtime_ns are what make and Python's .pyc files trust; the inode and ctime_ns (which no
    # tool sets back) also tell a file replaced by a copy that kept both (rsync, cp -p). What no stamp
    # tells: an edit that keeps the size within one tick of the file system's clock (a few ms; 1-2 s on
    # FAT, ext3). Hashing the contents would cost about 1 s a GB at every load, for a corpus that rarely
    # changes.
    stamp = None if stat is None else [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
    return {"format": FORMAT, "stagewise": __version__, "file": str(path), "options": options, "stamp": stamp}


def why_stale(found: dict[str, Any], expected: dict[str, Any]) -> str | None:
    """Why a load that expects the :func:`identity` ``expected`` does not use an entry whose header says
    ``found`` (which may be of any format); None when it uses it."""
    if found == expected:
        return None
    if found.get("format") != expected["format"]:
        return f"made in another format ({found.get('format')})"
    if found.get("stagewise") != expected["stagewise"]:
        return f"made by stagewise {found.get('stagewise')}"
    return "the file is gone" if expected["stamp"] is None else "the file changed"


def read_header(f: BinaryIO) -> dict[str, Any]:
    """The header of the entry ``f``, read from its start (``f`` is left at the words); raises what numpy or
    json make of a damaged one."""
    header = json.loads(_load(f).tobytes())
    if not isinstance(header, dict) or not isinstance(header.get("identity"), dict):
        raise ValueError("not a token-id cache entry's header")
    return header


@dataclass
class StoredEntry:
    """An entry in the cache folder as its header says (``file``, ``options``, ``tokens``: None where the
    header cannot be read); ``stale``: why no load uses it, None for a usable one."""

    path: Path
    size: int
    file: str | None
    options: Any
    tokens: Any
    stale: str | None


def stored_entries(folder: Path) -> list[StoredEntry]:
    """The entries in ``folder`` (the files named as entries are; none where it does not exist), each judged
    from its header alone: an entry's ids may take GBs. Then, as stale entries, the unfinished writes of
    entries that a killed process left (:data:`ABANDONED_AFTER`)."""
    paths = sorted(folder.iterdir()) if folder.is_dir() else []
    entries = [_stored(path) for path in paths if ENTRY_NAME.fullmatch(path.name) and path.is_file()]
    now = time.time()
    abandoned = (_abandoned(path, now) for path in paths if ENTRY_TEMP.fullmatch(path.name))
    return entries + [entry for entry in abandoned if entry is not None]


def _stored(path: Path) -> StoredEntry:
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            header = read_header(f)
    except Exception as exc:  # whatever numpy or json make of a damaged header, or a file that cannot be opened
        return StoredEntry(path, size, None, None, None, f"unreadable header ({type(exc).__name__}: {exc})")
    found = header["identity"]
    file = Path(str(found.get("file"))).resolve()  # as a load resolves the path it is given
    try:
        stat: os.stat_result | None = file.stat()
    except OSError:  # gone, or out of reach (an unmounted disk): no load reads it from there
        stat = None
    return StoredEntry(path, size, str(file), found.get("options"), header.get("tokens"),
                       why_stale(found, identity(file, found.get("options"), stat)))


def _abandoned(path: Path, now: float) -> StoredEntry | None:
    """The temp file ``path`` as a stale entry if no write has changed it for :data:`ABANDONED_AFTER` seconds."""
    try:
        found = path.stat()
    except OSError:  # its write has just ended: renamed into place or removed
        return None
    idle = now - found.st_mtime
    if not S_ISREG(found.st_mode) or idle < ABANDONED_AFTER:
        return None
    return StoredEntry(path, found.st_size, None, None, None,
                       f"an unfinished write that a killed process left (unchanged for {idle / 3600:.1f} h)")


@dataclass
class CacheEntry:
    """One file's entry at ``path``, valid when its header's identity is ``identity``."""

    cache: TextCache
    path: Path
    identity: dict[str, Any]
    header: dict[str, Any] | None = field(default=None, init=False)  # as holds() read it; read() reads on
    words_at: int = field(default=0, init=False)  # from its end

    def holds(self) -> bool:
        """Whether the entry is there and its header says it was made from this version of the file, with
        these options (a header that cannot be read: a warning)."""
        with self._opened() as f:
            self.header = None if f is None else self._header(f)
            self.words_at = 0 if f is None else f.tell()
        return self.header is not None

    def read(self) -> FileTokens | None:
        """The file's tokens, from the entry that :meth:`holds` found, or None: the entry is gone since, or
        damaged (a warning)."""
        header = self.header
        with self._opened() as f:
            if f is None or header is None:
                return None
            try:
                # on from the header holds() read: an entry another process replaced since must still hold the
                # number of ids and the CRC that header says, so the ids are those of this version of the file
                f.seek(self.words_at)
                words, ids = _load(f).tobytes(), _load(f)
                if ids.dtype != np.int32 or [len(ids), _checksum(words, ids)] != [header["tokens"], header["crc32"]]:
                    raise ValueError("its contents do not match their checksum")
                return FileTokens(ids, words.decode("utf-8", "surrogatepass").split("\n"))
            except Exception as exc:  # whatever numpy makes of a damaged file: the file is tokenised again
                self._damaged(exc)
                return None

    def write(self, tokens: FileTokens) -> None:
        """Keep ``tokens`` as the file's entry (atomically); a warning, and no more writes in this load,
        where the cache folder refuses or has too little room."""
        if not self.cache.writes:
            return
        problem = self._write(tokens)
        if problem is not None:
            self.cache.writes = False
            warnings.warn(f"stagewise: not caching the token ids of {self.identity['file']} in {self.path.parent} "
                          f"({problem}); each run tokenises it again. Set STAGEWISE_CACHE_DIR to a folder with "
                          f"room, or data.cache = false", stacklevel=2)

    def _write(self, tokens: FileTokens) -> str | None:
        """Write the entry; what stopped it, if anything."""
        words = "\n".join(tokens.words).encode("utf-8", "surrogatepass")  # a word may hold a lone surrogate
        header = {"identity": self.identity, "tokens": len(tokens.ids), "crc32": _checksum(words, tokens.ids)}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(self.path.parent).free
            if free - tokens.ids.nbytes < KEEP_FREE:
                return f"{free / 2**30:.1f} GiB free; an entry must leave {KEEP_FREE >> 30} GiB"
            arrays = (_bytes(json.dumps(header).encode()), _bytes(words), tokens.ids)
            atomic_write_bytes(self.path, lambda f: _save(f, arrays))
        except OSError as exc:
            return str(exc)
        return None

    @contextmanager
    def _opened(self) -> Iterator[BinaryIO | None]:
        try:
            f = self.path.open("rb")
        except OSError:  # none there, or none this user may read: the write after tokenising says why
            yield None
            return
        with f:
            yield f

    def _header(self, f: BinaryIO) -> dict[str, Any] | None:
        """The entry's header if it is this entry's, else None (a damaged one: a warning)."""
        try:
            header = read_header(f)
            return header if why_stale(header["identity"], self.identity) is None else None
        except Exception as exc:  # whatever numpy or json make of a damaged header
            self._damaged(exc)
            return None

    def _damaged(self, exc: Exception) -> None:
        warnings.warn(f"stagewise: the cached token ids of {self.identity['file']} ({self.path}) are damaged "
                      f"({type(exc).__name__}: {exc}); tokenising the file again", stacklevel=4)


def _load(f: Any) -> np.ndarray:
    return np.load(f, allow_pickle=False)


def _save(f: BinaryIO, arrays: tuple[np.ndarray, ...]) -> None:
    for array in arrays:  # one after another in one file: _load reads them back in turn
        np.save(f, array)


def _checksum(words: bytes, ids: np.ndarray) -> int:
    return zlib.crc32(ids.data, zlib.crc32(words))


def _bytes(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)
