"""Opening users' data files: a clear error when one is missing, gzip read transparently."""

from __future__ import annotations

import codecs
import gzip
import re
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from io import BufferedIOBase
from pathlib import Path

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


def open_data(path: str | Path, what: str) -> BufferedIOBase:
    """Open a file for reading bytes, decompressed if it is gzip (told by its content, since
    downloads are often decompressed but keep their .gz name, or the other way round)."""
    file = existing_file(path, what)
    with file.open("rb") as f:
        magic = f.read(2)
    return gzip.open(file, "rb") if magic == GZIP_MAGIC else file.open("rb")


# a line and its end as a file opened with newline="" gives them: "\n", "\r\n" or "\r" (csv needs them)
_LINE = re.compile(r"[^\r\n]*(?:\r\n?|\n)|[^\r\n]+")


def text_lines(path: str | Path, what: str, encoding: str, errors: str = "strict") -> Iterator[str]:
    """The lines of a file, as :func:`read_text` reads it, each with its line end as written, for the
    csv and json modules. Not a StringIO of the text: that holds it again, at 4 bytes a character."""
    text = read_text(path, what, encoding, errors)
    return (line[0] for line in _LINE.finditer(text))


def read_text(path: str | Path, what: str, encoding: str = "utf-8", errors: str = "strict") -> str:
    """The whole text of a file in ``encoding`` (gzip allowed; with UTF-8 a leading BOM, as Excel
    and Notepad write, dropped). A byte the encoding cannot read is a DataError naming the file,
    its offset and line (``errors="replace"`` reads it as U+FFFD instead); so is text in UTF-16/32
    or with a NUL byte (binary data) where an ASCII-based encoding such as UTF-8 is expected."""
    with open_data(path, what) as f, gzip_errors(path):
        raw = f.read()
    if _ascii_based(encoding):
        check_not_wide_text(raw, path, what)
    utf8 = codecs.lookup(encoding).name == "utf-8"
    try:
        return raw.decode("utf-8-sig" if utf8 else encoding, errors)
    except UnicodeDecodeError as exc:
        offset = exc.start + (len(codecs.BOM_UTF8) if utf8 and raw.startswith(codecs.BOM_UTF8) else 0)
        raise DataError(f"{what} {path}, line {_line_at(raw, offset)}: byte 0x{raw[offset]:02x} at offset {offset} "
                        f"is not {encoding} text; give the file's encoding (data.encoding, e.g. \"latin-1\" or "
                        f"\"cp1252\") or save the file as UTF-8") from None


def encoding_problem(encoding: str) -> str | None:
    """What is wrong with the ``encoding`` key of text datasets unless Python can read text in ``encoding``."""
    try:
        b"\0".decode(encoding, "replace")  # not b"": decoding no bytes looks no codec up
    except LookupError:  # an unknown name, or a codec of bytes to bytes such as "base64"
        return (f'{encoding!r} is not a text encoding Python knows; use e.g. "utf-8" (the default), "latin-1" '
                f'or "cp1252"')
    return None


def _ascii_based(encoding: str) -> bool:
    """Whether ``encoding`` writes NUL and newline as single bytes (UTF-8, Latin-1, ...; not UTF-16/32)."""
    return "\0\n".encode(encoding) == b"\0\n"


# byte-order marks of text an ASCII-based encoding cannot read (UTF-32 first: its LE mark starts as UTF-16's)
_FOREIGN_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
                 (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))


def check_not_wide_text(raw: bytes, path: str | Path, what: str) -> None:
    """DataError naming the file (and the line of the first NUL byte) if ``raw`` is UTF-16/32 text or binary data."""
    encoding = next((name for bom, name in _FOREIGN_BOMS if raw.startswith(bom)), None)
    if encoding is not None:
        raise DataError(f"{what} {path} is {encoding} text (it starts with a {encoding} byte-order mark); "
                        f"save it as UTF-8 and run again (or set data.encoding = \"{encoding.lower()}\")")
    nul = raw.find(b"\0")
    if nul >= 0:
        raise DataError(f"{what} {path}, line {_line_at(raw, nul)}: a NUL byte, so this is not UTF-8 text (UTF-16 "
                        f"text without a byte-order mark, or binary data); save it as UTF-8 text and run again")


def _line_at(raw: bytes, offset: int) -> int:
    """The line (from 1) of byte ``offset``, lines ending at LF, CR LF or a lone CR as the loaders read them."""
    return raw.count(b"\n", 0, offset) + raw.count(b"\r", 0, offset) - raw.count(b"\r\n", 0, offset) + 1


@contextmanager
def gzip_errors(path: str | Path) -> Iterator[None]:
    """A truncated or corrupt gzip file fails mid-read, far from the open: name the file and the fix."""
    try:
        yield
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataError(f"{path}: broken gzip data ({exc}); the download may be truncated, "
                        f"fetch the file again") from None
