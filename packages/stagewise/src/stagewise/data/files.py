"""Opening users' data files: a clear error when one is missing, gzip read transparently."""

from __future__ import annotations

import codecs
import gzip
import re
import zlib
from collections.abc import Callable, Generator, Iterable, Iterator
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
BLOCK = 1 << 20  # bytes read and decoded at a time: a big file's text is never held whole


def text_lines(path: str | Path, what: str, encoding: str, errors: str = "strict",
               read: Callable[[int], object] | None = None) -> Iterator[str]:
    """The lines of a file, as :func:`read_text` reads it, each with its line end as written, for the
    csv and json modules; read a block at a time (:func:`stream_text`, which takes ``read``), so only a
    line is held whole."""
    for piece in recut(stream_text(path, what, encoding, errors, read), _after_last_line_end):
        yield from (line[0] for line in _LINE.finditer(piece))


def _after_last_line_end(text: str) -> int:
    """Where the last whole line of ``text`` ends; a CR at its very end may be a CR LF's first half."""
    return max(text.rfind("\n"), text.rfind("\r", 0, len(text) - 1)) + 1


def recut(pieces: Iterable[str], cut: Callable[[str], int]) -> Iterator[str]:
    """The text of ``pieces`` again, each new piece ending where ``cut(text)`` says its text's last whole unit
    (a line, a word) ends; the rest waits for the next piece. The last piece, the text's end, is not cut: a
    text in one piece comes back as it is."""
    rest: list[str] = []  # parts of a unit not yet given out
    previous: str | None = None
    for piece in pieces:
        if previous is not None:
            rest = yield from _cut(previous, cut, rest)
        previous = piece
    if previous is not None:
        yield "".join([*rest, previous])


def _cut(piece: str, cut: Callable[[str], int], rest: list[str]) -> Generator[str, None, list[str]]:
    """``rest`` and ``piece`` up to ``cut(piece)``, if a unit ends in it; returns what is left."""
    end = cut(piece)
    if end == 0:  # kept in parts, so a long unit is not copied again with every piece
        return [*rest, piece]
    head = piece if end == len(piece) else piece[:end]
    yield "".join([*rest, head]) if rest else head
    return [piece[end:]] if end < len(piece) else []


def read_text(path: str | Path, what: str, encoding: str = "utf-8", errors: str = "strict") -> str:
    """The whole text of a file in ``encoding``, as :func:`stream_text` reads it."""
    return "".join(stream_text(path, what, encoding, errors))


def stream_text(path: str | Path, what: str, encoding: str = "utf-8", errors: str = "strict",
                read: Callable[[int], object] | None = None) -> Iterator[str]:
    """The text of a file in ``encoding``, decoded :data:`BLOCK` bytes at a time (gzip allowed; with UTF-8 a
    leading BOM, as Excel and Notepad write, dropped). A byte the encoding cannot read is a DataError naming
    the file, its offset and line (``errors="replace"`` reads it as U+FFFD instead); so is text in UTF-16/32
    or with a NUL byte (binary data) where an ASCII-based encoding such as UTF-8 is expected. A reader that
    stops early reads no further. ``read(n)`` is told each time n more bytes of the file are read (bytes on
    disk: compressed ones, for gzip), for a progress bar."""
    utf8 = codecs.lookup(encoding).name == "utf-8"
    decoder = codecs.getincrementaldecoder("utf-8" if utf8 else encoding)(errors)
    place = _Place(Path(path), what, encoding)
    with open_data(path, what) as source, gzip_errors(path):
        disk = getattr(source, "fileobj", source)  # a GzipFile reads the file on disk through its fileobj
        for block in _blocks(source, disk, read):
            if place.offset == 0:
                block = place.start(block, utf8)
            if _ascii_based(encoding):
                _check_not_wide_text(block, place)
            pending = decoder.getstate()[0]  # the start of a character the last block cut
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                raise place.undecodable(pending, exc) from None
            place.offset += len(block)
            if text:
                yield text


def _blocks(source: BufferedIOBase, disk: BufferedIOBase, read: Callable[[int], object] | None) -> Iterator[bytes]:
    """The blocks of bytes of ``source``, then one empty block (the decoder's last call); each read told to
    ``read`` as the bytes it took from ``disk``."""
    position, size = 0, max(BLOCK, 4)  # the first block holds any byte-order mark whole
    while True:
        block = source.read(size)
        size = BLOCK
        if read is not None:
            now = disk.tell()
            read(now - position)
            position = now
        yield block
        if not block:
            return


class _Place:
    """Where a streamed file's decoding is: the bytes before the current block, to name the place of a byte it
    cannot read as a read of the whole file would."""

    def __init__(self, file: Path, what: str, encoding: str):
        self.file, self.what, self.encoding = file, what, encoding
        self.offset = 0

    def start(self, block: bytes, utf8: bool) -> bytes:
        """The first block, less a UTF-8 BOM (counted in the offsets)."""
        if utf8 and block.startswith(codecs.BOM_UTF8):
            self.offset = len(codecs.BOM_UTF8)
            return block[len(codecs.BOM_UTF8):]
        return block

    def line(self, offset: int) -> int:
        """The line (from 1) of the file's byte ``offset``: the lines before it are counted only now, for an error,
        from a second read of the file up to there."""
        with open_data(self.file, self.what) as f:
            return _line_ends(f.read(offset)) + 1

    def undecodable(self, pending: bytes, exc: UnicodeDecodeError) -> DataError:
        """The DataError of a byte the decoder could not read; ``pending``: bytes of the last block it held
        (they start ``exc.object``)."""
        offset = self.offset - len(pending) + exc.start
        return DataError(f"{self.what} {self.file}, line {self.line(offset)}: byte 0x{exc.object[exc.start]:02x} at "
                         f"offset {offset} is not {self.encoding} text; give the file's encoding (data.encoding, "
                         f"e.g. \"latin-1\" or \"cp1252\") or save the file as UTF-8")


def _line_ends(data: bytes) -> int:
    """Line ends in ``data``: LF, CR LF or a lone CR, as the loaders read them."""
    return data.count(b"\n") + data.count(b"\r") - data.count(b"\r\n")


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


def _check_not_wide_text(block: bytes, place: _Place) -> None:
    """DataError naming the file (and the line of the first NUL byte) if ``block``, at ``place`` in it, is
    UTF-16/32 text or binary data."""
    encoding = next((name for bom, name in _FOREIGN_BOMS if block.startswith(bom)), None) if place.offset == 0 else None
    if encoding is not None:
        raise DataError(f"{place.what} {place.file} is {encoding} text (it starts with a {encoding} byte-order "
                        f"mark); save it as UTF-8 and run again (or set data.encoding = \"{encoding.lower()}\")")
    nul = block.find(b"\0")
    if nul >= 0:
        raise DataError(f"{place.what} {place.file}, line {place.line(place.offset + nul)}: a NUL byte, so this is not "
                        f"UTF-8 text (UTF-16 text without a byte-order mark, or binary data); save it as UTF-8 "
                        f"text and run again")


@contextmanager
def gzip_errors(path: str | Path) -> Iterator[None]:
    """A truncated or corrupt gzip file fails mid-read, far from the open: name the file and the fix."""
    try:
        yield
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataError(f"{path}: broken gzip data ({exc}); the download may be truncated, "
                        f"fetch the file again") from None
