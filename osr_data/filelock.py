"""One process at a time: an exclusive flock, waited for (``exclusive_lock``) or refused
(``refusing_lock``).

The kernel releases a flock when its holder dies, so a killed process never leaves a
stale lock behind.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path
from typing import Iterator

from .errors import BackMixError

log = logging.getLogger("backmix")


@contextlib.contextmanager
def refusing_lock(lock: Path, held_elsewhere: str) -> Iterator[None]:
    """An exclusive flock on the file ``lock`` for the block; while another process holds it, this one
    is refused in one line, ``held_elsewhere`` (which names what runs and what to do)."""
    try:
        f = open(lock, "a")
    except OSError as e:
        raise BackMixError(f"cannot write {lock}: {e.strerror or e}") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BackMixError(held_elsewhere) from None
        yield


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on ``.NAME.lock`` beside ``path``: one writer at a time, the others wait.

    The holder removes the lock file when done (no litter); a waiter that then wakes up holding
    the removed file's lock sees it is no longer the file at that name and locks the new one.
    """
    path = Path(path)
    lock = path.with_name(f".{path.name}.lock")
    waited = False
    while True:
        f = open(lock, "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not waited:
                log.info("another process is writing %s: waiting for it", path)
                waited = True
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            if os.path.samestat(os.fstat(f.fileno()), os.stat(lock)):
                break
        except FileNotFoundError:
            pass
        f.close()
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        f.close()
