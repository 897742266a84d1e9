"""Writing files and folders the project's commands produce: atomic writes and output checks.

Every stage writes through these: a reader never sees half a file or folder (the temporary one is
renamed onto the target), and a destination that cannot take the output is refused before any
work, in one line naming it. Temporaries are named ``.<name>.tmp-<pid>...`` beside the target, so
one left by a killed writer is removed by the next (``osr_data.abandoned_temps``).
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

from backmix.osr_data.abandoned_temps import remove_abandoned_temps
from backmix.osr_data.errors import NO_SPACE_ERRNOS, BackMixError, no_space


@contextlib.contextmanager
def full_disk_names(path: Path) -> Iterator[None]:
    """A full disk (or quota) met in the block is one line naming ``path``, the output it was for."""
    try:
        yield
    except OSError as e:
        if e.errno in NO_SPACE_ERRNOS:
            raise no_space(e, writing=path) from None
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary name beside ``path`` for the block to write; then fsyncs it and renames it
    onto ``path``, so readers never see half a file. If the block raises, the temporary file goes; a
    full disk is one line naming ``path``."""
    path = Path(path)
    remove_abandoned_temps(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with full_disk_names(path):
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out``, on failure it goes.

    The folder is named ``.<out>.tmp-<pid>-<random>``: one left by a process that no longer runs
    (killed with -9) is removed here. It is made with ``os.mkdir``, so the umask sets its mode."""
    tmp = _make_temp_folder(out)
    try:
        with full_disk_names(out):
            yield tmp
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _make_temp_folder(out: Path) -> Path:
    ancestor = existing_ancestor(out)
    if not ancestor.is_dir():
        raise BackMixError(f"cannot write {out}: {ancestor} is a file, not a folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned_temps(out)
        while True:
            tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
            try:
                os.mkdir(tmp)
                return tmp
            except FileExistsError:
                continue
    except OSError as e:
        raise BackMixError(f"cannot write {out}: {e.strerror or e}"
                           + (f" ({e.filename})" if e.filename and Path(e.filename) != out else "")) from None


def existing_ancestor(path: Path) -> Path:
    """The nearest of ``path``'s parents that exists (a folder, or a file a path runs through)."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def write_error(folder: Path) -> Optional[OSError]:
    """The OSError creating a file in ``folder`` gets, None if it can: tried, not guessed (root ignores modes)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as e:
        return e


def writable_folder(folder: Path) -> bool:
    return write_error(folder) is None


def check_output_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Refuse, before any work, an output file that cannot be written: a folder, a path under a
    file, or a folder this process may not write in."""
    path = Path(path)
    if path.is_dir():
        raise BackMixError(f"{flag} {path} is a folder; give a file name")
    folder = existing_ancestor(path)
    if not folder.is_dir():
        raise BackMixError(f"{flag} {path}: {folder} is a file, not a folder")
    if not writable_folder(folder):
        raise BackMixError(f"{flag} {path}: cannot write in {folder} (read-only)")
    return path


def check_output_folder(path: Path, flag: str = "--out", purpose: str = "a run") -> Path:
    """An output folder (made here, parents too) that takes files, checked before any work."""
    if path.exists() and not path.is_dir():
        raise BackMixError(f"{flag} {path} is a file; {purpose} needs a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        error = write_error(path)
    except OSError as e:
        error = e
    if error is not None:
        raise BackMixError(f"{flag} {path} cannot be written: {error.strerror or error}")
    return path


def fsync_dir(folder: Path) -> None:
    """Makes a rename into ``folder`` durable (the folder's entry, not only the file's bytes)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
