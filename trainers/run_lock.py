"""One ``train`` at a time in a run folder.

Two runs into one ``--out`` would interleave their metrics and leave one run's config beside the
other's weights. The first holds an exclusive ``flock`` on ``RUN/.run.lock`` for as long as it runs;
a second (a new run or a ``--resume``) is refused in one line. The kernel releases the lock when
the holder dies, however it dies, so a killed run never blocks its own ``--resume``.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from backmix.osr_data.filelock import refusing_lock

LOCK_NAME = ".run.lock"


@contextlib.contextmanager
def hold_run_folder(run: Path, made_here: bool = False) -> Iterator[None]:
    """Hold ``run``'s lock for the block. ``made_here``: the folder was made for this run, so a run refused
    before it wrote anything (bad data, say) removes it again rather than leaving an empty folder behind."""
    path = Path(run) / LOCK_NAME
    with refusing_lock(path, f"another backmix train is running in {run} (it holds {path}); wait for it to "
                             "end or choose another --out"):
        try:
            yield
        finally:
            if made_here and os.listdir(run) == [LOCK_NAME]:
                path.unlink()
                Path(run).rmdir()
