"""Opening users' data files: a clear error when one is missing, gzip read transparently."""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from stagewise.data.splits import DataError

GZIP_MAGIC = b"\x1f\x8b"


def existing_file(path: str | Path, what: str) -> Path:
    """``path`` as a Path; DataError naming it and ``what`` it should be if it is not a file."""
    file = Path(path).expanduser()
    if not file.is_file():
        problem = "is a directory" if file.is_dir() else "does not exist"
        hint = "" if file.is_absolute() else f" (relative paths start from the current directory {Path.cwd()})"
        raise DataError(f"{what} {file} {problem}; check the path{hint}")
    return file


def open_data(path: str | Path, what: str) -> IO[bytes]:
    """Open a file for reading bytes, decompressed if it is gzip (told by its content, since
    downloads are often decompressed but keep their .gz name, or the other way round)."""
    file = existing_file(path, what)
    with file.open("rb") as f:
        magic = f.read(2)
    return gzip.open(file, "rb") if magic == GZIP_MAGIC else file.open("rb")


def open_text(path: str | Path, what: str) -> IO[str]:
    """Open a UTF-8 text file (gzip allowed; a leading BOM, as Excel writes, dropped) for the csv
    and json modules (``newline=""``).

    Undecodable bytes become U+FFFD, so they surface as a bad value on a known line."""
    return io.TextIOWrapper(open_data(path, what), encoding="utf-8-sig", errors="replace", newline="")


@contextmanager
def gzip_errors(path: str | Path) -> Iterator[None]:
    """A truncated or corrupt gzip file fails mid-read, far from the open: name the file and the fix."""
    try:
        yield
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataError(f"{path}: broken gzip data ({exc}); the download may be truncated, "
                        f"fetch the file again") from None
