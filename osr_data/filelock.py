"""One process at a time: an exclusive flock on ``.NAME.lock`` beside a path.

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

log = logging.getLogger("backmix")


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
