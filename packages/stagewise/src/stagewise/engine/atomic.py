"""Atomic file writes: a temp file beside the target, fsynced, renamed over it, the folder fsynced; and the
removal of the temp files a killed process left. Every file a run writes goes through
:func:`atomic_write_bytes` (checkpoints, records, plots, exports, the token cache). No torch here, so the
token cache's module, and with it ``stagewise cache``, loads in a fraction of a second.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path


def _read_umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back, once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()
TEMP_GLOB = ".*.tmp"  # atomic_write_bytes's temp file beside NAME: .NAME.<random>.tmp


def remove_temp_files(folder: Path) -> None:
    """Delete the temp files of atomic writes into ``folder`` that a killed process (SIGKILL, no
    cleanup) left: only a run that writes there again knows that none of them is in use."""
    for temp in folder.glob(TEMP_GLOB):
        temp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, write, replace: bool = True) -> None:
    """Call ``write(file)`` on a temp file beside ``path``, fsync, rename over ``path``, fsync the folder;
    ``replace=False``: FileExistsError instead where ``path`` exists, as another process may have put it there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # TEMP_GLOB matches it
    except OSError as exc:  # name the folder that refused, not the temp file's random name
        raise type(exc)(exc.errno, exc.strerror, str(path.parent)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private (0600); a plain open would not
        if replace:
            os.replace(tmp, path)
        else:
            _place_new(Path(tmp), path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        refused = _os_error(exc)
        if refused is None or refused.errno is None or refused.filename is not None:
            raise
        # name the file being written (a write's OSError names none): "PATH: No space left on device"
        raise OSError(refused.errno, refused.strerror, str(path)) from exc
    _fsync_folder(path.parent)


# what a link(2) into a file system without hard links (FAT, some network shares) fails with
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}
# and Windows's CreateHardLink (ERROR_INVALID_FUNCTION on FAT/exFAT, ERROR_NOT_SUPPORTED on a share), which
# Python reports as EINVAL: told apart from other EINVALs by the Windows error code
_WINDOWS_NO_HARD_LINKS = {1, 50}


def _no_hard_links(exc: OSError) -> bool:
    return exc.errno in _NO_HARD_LINKS or getattr(exc, "winerror", None) in _WINDOWS_NO_HARD_LINKS


def _place_new(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path`` unless ``path`` exists (FileExistsError): a hard link, which unlike a
    rename never replaces a file, so of two processes placing one name only one succeeds."""
    try:
        os.link(tmp, path)
    except OSError as exc:
        if not _no_hard_links(exc):
            raise
        if path.exists():  # no hard links: checked, then renamed, which leaves the two processes a moment's race
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def _fsync_folder(folder: Path) -> None:
    """Make a rename into ``folder`` survive a power cut: the file's fsync covers its bytes, not the
    folder entry that names it (where the system can open a folder: not on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a folder this user may write but not read (mode -wx): the file is in place all the same
        return
    try:
        os.fsync(fd)
    except OSError:  # a file system that cannot sync a folder (EINVAL on some): the rename has happened all the same
        pass
    finally:
        os.close(fd)


def _os_error(exc: BaseException | None) -> OSError | None:
    """The file system's refusal behind ``exc``: ``exc`` itself, or the OSError that torch.save's
    writer turned into a RuntimeError ("unexpected pos ...") as the disk filled up."""
    while exc is not None and not isinstance(exc, OSError):
        exc = (exc.__cause__ or exc.__context__) if isinstance(exc, RuntimeError) else None
    return exc
