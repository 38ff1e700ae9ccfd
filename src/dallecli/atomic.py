"""Atomic writes: every file or folder this project makes goes to a temporary name beside its final place, is
flushed to disk, and is then renamed (replacing what was there) or hard-linked (never replacing anything) into
place. A failure at any point, Ctrl-C included, removes the temporary name, so a reader or a crash never sees a
half-written file. A full disk (or an exceeded quota) is :class:`~dallecli.errors.DiskFullError`, here only.

Temporary names start with ``.tmp-`` and get the mode a plain ``open`` would give (``tempfile`` makes them
0600): 0666/0777 less the umask, read once at import.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from dallecli.errors import DiskFullError

DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))  # no space left, quota exceeded
PREFIX = ".tmp-"
FREE_SPACE = "Free some space and try again"


def _read_umask() -> int:
    """The process umask. Linux shows it in /proc; elsewhere it can only be read by setting it and back, which
    is done once, here, at import (before any thread exists), never while threads (``dalle serve``) run."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def default_mode(path: Path, directory: bool = False) -> None:
    """Give a file or folder made by ``tempfile`` (mode 0600/0700) the mode a plain ``open`` or ``mkdir`` would.

    The umask was read once at import: flipping it per call would race with other threads.

    Args:
        path: the file or folder.
        directory: True for a folder (0777 less the umask), False for a file (0666 less the umask).
    """
    os.chmod(path, (0o777 if directory else 0o666) & ~_UMASK)


def is_disk_full(exc: BaseException) -> bool:
    """True for "no space left on device" or "quota exceeded", whether raised by Python (``OSError``) or
    by safetensors' Rust writer (an error whose text carries the OS error).

    Args:
        exc: any exception.

    Returns:
        Whether it reports a full disk or an exceeded quota.
    """
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        return True
    text = str(exc)
    return "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text


@contextmanager
def disk_full_as_error(what: str, advice: str = FREE_SPACE) -> Iterator[None]:
    """Turn a full disk inside the block into one :class:`DiskFullError` saying what could not be written.

    Args:
        what: what was being written ("an image in out/", "checkpoint step-0000002 in ckpt/").
        advice: the next step for the user, one sentence.

    Raises:
        DiskFullError: an error inside the block reported a full disk (:func:`is_disk_full`); other errors pass.
    """
    try:
        yield
    except BaseException as exc:
        if is_disk_full(exc):
            raise DiskFullError(f"the disk is full: could not write {what}; nothing was left half-written. "
                                f"{advice}") from exc
        raise


@contextmanager
def staged_file(folder: Path, suffix: str = "", *, what: str | None = None,
                advice: str = FREE_SPACE) -> Iterator[Path]:
    """A new empty temporary file in ``folder`` (created), to fill and then :func:`place`; its name is removed
    when the block ends, whatever happens (after :func:`place` has hard-linked it, that drops the extra name).

    Args:
        folder: where the file's final place will be (a rename only stays atomic within one file system).
        suffix: the temporary name's ending (".png": a reader of the folder can tell what it will be).
        what: what is being written, for the disk-full message; default "a file in FOLDER".
        advice: the disk-full message's next step.

    Yields:
        The temporary file's path (``.tmp-XXXX<suffix>``, mode 0666 less the umask).

    Raises:
        DiskFullError: the disk filled up inside the block; nothing is left.
    """
    folder = Path(folder)
    tmp = None
    with disk_full_as_error(what or f"a file in {folder}", advice):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=PREFIX, suffix=suffix, dir=folder)
            os.close(fd)
            tmp = Path(name)
            default_mode(tmp)
            yield tmp
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)  # Windows flushes only writable handles
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def place(tmp: Path, final: Path, *, overwrite: bool = True) -> None:
    """Flush ``tmp`` to disk, then give it the name ``final`` in one step.

    Args:
        tmp: a file from :func:`staged_file`, written and closed.
        final: its final path, in the same folder.
        overwrite: True: rename over whatever ``final`` is; False: hard-link, so a file that exists (made by
            this or any other process, even a moment ago) is never replaced. Where the file system has no hard
            links, the name is claimed with an exclusive create first, then the file renamed onto it.

    Raises:
        FileExistsError: ``overwrite`` is False and ``final`` exists.
        OSError: the file cannot be flushed or named.
    """
    _fsync(tmp)
    if overwrite:
        os.replace(tmp, final)
        return
    try:
        os.link(tmp, final)  # fails if final exists: no overwrite, even against other processes
    except FileExistsError:
        raise
    except OSError:  # no hard links here
        os.close(os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))  # FileExistsError if taken
        os.replace(tmp, final)


def write_file(path: Path, data: bytes | str | Callable[[BinaryIO], object], *, overwrite: bool = True,
               what: str | None = None, advice: str = FREE_SPACE) -> Path:
    """Write ``path`` atomically: a temporary file beside it, flushed to disk, then renamed or linked into place.

    Args:
        path: the file to write (its folder is created).
        data: the bytes, a text (written as UTF-8), or ``fill(handle)`` that writes to a binary file handle.
        overwrite: replace an existing ``path`` (True), or raise ``FileExistsError`` and write nothing (False).
        what: what is being written, for the disk-full message; default the path.
        advice: the disk-full message's next step.

    Returns:
        ``path``.

    Raises:
        DiskFullError: no space left (or quota exceeded); nothing is left.
        FileExistsError: ``overwrite`` is False and ``path`` exists.
        OSError: the file cannot be written.
    """
    path = Path(path)
    with staged_file(path.parent, path.suffix, what=what or str(path), advice=advice) as tmp:
        with open(tmp, "wb") as handle:
            if callable(data):
                data(handle)
            else:
                handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        place(tmp, path, overwrite=overwrite)
    return path


@contextmanager
def staged_folder(final: Path, *, overwrite: bool = True, what: str | None = None,
                  advice: str = FREE_SPACE) -> Iterator[Path]:
    """A new empty temporary folder beside ``final`` to fill; when the block ends normally its files are
    flushed to disk and it is renamed to ``final``; when it raises (Ctrl-C included) it is removed.

    Args:
        final: the folder to make (its parent is created).
        overwrite: True: a folder already at ``final`` is removed first; False: it is kept, and the new one
            dropped (``FileExistsError``), as when another process made the same folder first.
        what: what is being written, for the disk-full message; default the folder's path.
        advice: the disk-full message's next step.

    Yields:
        The temporary folder (``.tmp-XXXX``, mode 0777 less the umask).

    Raises:
        DiskFullError: the disk filled up; nothing is left and an older ``final`` is kept.
        FileExistsError: ``overwrite`` is False and ``final`` exists.
    """
    final = Path(final)
    staging = None
    with disk_full_as_error(what or str(final), advice):
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=PREFIX, dir=final.parent))
            default_mode(staging, directory=True)
            yield staging
            for path in sorted(staging.rglob("*")):
                if path.is_file() and not path.is_symlink():
                    _fsync(path)
            if final.exists():
                if not overwrite:
                    raise FileExistsError(errno.EEXIST, "exists", str(final))
                if final.is_dir() and not final.is_symlink():
                    shutil.rmtree(final)
                else:
                    final.unlink()
            try:
                os.replace(staging, final)
            except OSError:  # another process made it meanwhile (a folder is not replaced by a rename)
                if overwrite or not final.exists():
                    raise
                raise FileExistsError(errno.EEXIST, "exists", str(final)) from None
        finally:
            if staging is not None and staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
