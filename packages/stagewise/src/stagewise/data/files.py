"""Opening users' data files: a clear error when one is missing, gzip read transparently."""

from __future__ import annotations

import codecs
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
    """``path`` as a Path; DataError naming it and ``what`` it should be if it is not a readable file."""
    file = Path(path).expanduser()
    if not file.is_file():
        if file.exists() and not file.is_dir():  # loaders read a file more than once: a stream will not do
            raise DataError(f"{what} {file} is not a regular file (a pipe, socket or device); save the data "
                            f"to a file and give its path")
        problem = "is a directory" if file.is_dir() else "does not exist"
        hint = "" if file.is_absolute() else f" (relative paths start from the current directory {Path.cwd()})"
        raise DataError(f"{what} {file} {problem}; check the path{hint}")
    try:
        file.open("rb").close()
    except OSError as exc:  # no permission, mostly
        raise DataError(f"{what} {file} cannot be read ({exc.strerror}); check its permissions "
                        f"(e.g. chmod a+r)") from None
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

    Undecodable bytes become U+FFFD, so they surface as a bad value on a known line; a file that
    starts as UTF-16/32 or binary data (a NUL byte in its first 64 KiB) is refused here."""
    f = open_data(path, what)
    try:
        with gzip_errors(path):
            head = f.read(1 << 16)
            f.seek(0)
        check_utf8(head, path, what)
    except BaseException:
        f.close()
        raise
    return io.TextIOWrapper(f, encoding="utf-8-sig", errors="replace", newline="")


def read_text(path: str | Path, what: str) -> str:
    """The whole text of a UTF-8 file (gzip allowed, a leading BOM dropped, undecodable bytes as
    U+FFFD: some corpora are Latin-1, and a stray byte must not stop training); refused if it is
    UTF-16/32 or holds a NUL byte (binary data), which would otherwise be read as garbage words."""
    with open_data(path, what) as f, gzip_errors(path):
        raw = f.read()
    check_utf8(raw, path, what)
    return raw.decode("utf-8-sig", errors="replace")


# byte-order marks of the encodings a text file must not be in (UTF-32 first: its LE mark starts as UTF-16's)
_FOREIGN_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
                 (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))


def check_utf8(raw: bytes, path: str | Path, what: str) -> None:
    """DataError naming the file (and the line of the first NUL byte) unless ``raw`` can be UTF-8 text."""
    encoding = next((name for bom, name in _FOREIGN_BOMS if raw.startswith(bom)), None)
    if encoding is not None:
        raise DataError(f"{what} {path} is {encoding} text (it starts with a {encoding} byte-order mark); "
                        f"save it as UTF-8 and run again")
    nul = raw.find(b"\0")
    if nul >= 0:
        line = raw.count(b"\n", 0, nul) + 1
        raise DataError(f"{what} {path}, line {line}: a NUL byte, so this is not UTF-8 text (UTF-16 text "
                        f"without a byte-order mark, or binary data); save it as UTF-8 text and run again")


@contextmanager
def gzip_errors(path: str | Path) -> Iterator[None]:
    """A truncated or corrupt gzip file fails mid-read, far from the open: name the file and the fix."""
    try:
        yield
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataError(f"{path}: broken gzip data ({exc}); the download may be truncated, "
                        f"fetch the file again") from None
