"""The SHA-256 of a file's bytes: what names a checkpoint in the cache it built, and what ties an
index file to its binary copy."""
from __future__ import annotations

import hashlib
import os


def file_digest(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the file at ``path``, read in 1 MiB blocks (a checkpoint may be gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
