"""FFCV's beton writer run in a child process group: stoppable within seconds, its failures one line.

FFCV's ``DatasetWriter`` forks worker processes and waits forever for one that died. So the
writer runs in a forked child in its own process group: Ctrl-C or SIGTERM stops the group (the
writer and its workers) within seconds, and a traceback from any of them ends the write. A
worker that must stop the write on purpose (a file missing or changed since indexing) writes its
one-line reason to the samples' ``stop_file`` before raising; that line is what the user sees.
"""
from __future__ import annotations

import contextlib
import errno
import multiprocessing
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from backmix.osr_data.errors import BackMixError, Terminated, no_space

PROGRESS_EVERY = 5    # percent between progress lines when stderr is not a terminal
STOP_GRACE_S = 3.0    # after SIGTERM, seconds the writer gets before SIGKILL


class StopFile:
    """Where a writer worker leaves the reason it stopped the write (inherited by forked processes)."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile()

    def say(self, reason: str) -> None:
        os.write(self._file.fileno(), reason.splitlines()[0].encode() + b"\n")

    def reason(self) -> str:
        """The first reason said, "" when none was."""
        return os.pread(self._file.fileno(), 1 << 16, 0).decode(errors="replace").split("\n")[0]


class LineProgress(tqdm):
    """tqdm for a log file or pipe: a whole line every ``PROGRESS_EVERY`` percent, no carriage returns."""

    def __init__(self, *args, **kwargs) -> None:
        self._shown = -1
        super().__init__(*args, **{**kwargs, "mininterval": 0, "miniters": 1})

    def display(self, msg=None, pos=None):
        step = int(100 * self.n / self.total) // PROGRESS_EVERY if self.total else 0
        if step != self._shown:
            self._shown = step
            self.fp.write(self.format_meter(**self.format_dict) + "\n")
            self.fp.flush()
        return True


def progress_bar(show: Optional[bool], **kwargs) -> tqdm:
    """A tqdm bar on stderr: animated on a terminal, a line every few percent otherwise; none when
    ``show`` is False (None: always)."""
    kwargs.setdefault("file", sys.stderr)
    if show is False:
        return tqdm(disable=True, **kwargs)
    return tqdm(**kwargs) if kwargs["file"].isatty() else LineProgress(**kwargs)


def write_in_child(tmp: Path, samples, fields: dict, num_workers: int, progress: Optional[bool],
                   desc: str) -> None:
    """Runs FFCV's writer of ``samples`` (an indexed dataset with a ``stop_file``) in a forked child in
    its own process group (with the writer's worker processes); a KeyboardInterrupt here (Ctrl-C, or
    SIGTERM, turned into ``Terminated``) stops the group: SIGTERM, then SIGKILL after ``STOP_GRACE_S``."""
    # The writer's and its workers' stderr goes to a file read here: a full disk is then one line, not
    # a worker's traceback before it; any other failure shows what they said.
    said = tempfile.TemporaryFile()
    proc = multiprocessing.get_context("fork").Process(
        target=_child_write, args=(tmp, samples, fields, num_workers, progress, desc, said.fileno()), daemon=False)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    text = ""
    try:
        proc.start()
        # FFCV's writer waits forever for a worker that died (e.g. of a full disk): a traceback from
        # any of them ends the write.
        while proc.exitcode is None and "Traceback" not in text:
            proc.join(0.5)
            said.seek(0)
            text = said.read().decode(errors="replace")
        if proc.exitcode is None:
            _stop_group(proc)
    except (KeyboardInterrupt, Terminated):
        _stop_group(proc)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if proc.exitcode != 0:
        stop = getattr(samples, "stop_file", None)   # a plain dataset (the stock beton's) has none
        if stop is not None and stop.reason():
            raise BackMixError(stop.reason())
        if f"[Errno {errno.ENOSPC}]" in text or f"[Errno {errno.EDQUOT}]" in text:
            raise no_space(OSError(errno.ENOSPC, "no space"), writing=tmp)
        sys.stderr.write(text)
        raise BackMixError(f"FFCV's writer failed (exit status {proc.exitcode}) writing {tmp}")


def _interrupt(signum, frame):
    raise Terminated


def _stop_group(proc) -> None:
    for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        proc.join(wait)
        if proc.exitcode is not None and sig == signal.SIGTERM:
            # the child is gone; its workers may not be (they share its group)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            return


def _child_write(tmp: Path, samples, fields: dict, num_workers: int,
                 progress: Optional[bool], desc: str, said: int) -> None:
    import ffcv.writer
    os.setpgrp()                                    # the parent stops us and our workers as one group
    bar_file = os.fdopen(os.dup(2), "w")            # the progress bar stays on the terminal
    os.dup2(said, 2)
    sys.stderr = open(2, "w", buffering=1, closefd=False)   # what the workers forked from here print, too
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # the parent handles Ctrl-C
    writer = ffcv.writer.DatasetWriter(str(tmp), fields, num_workers=max(1, num_workers))

    def stop(signum, frame):
        # FFCV's metadata lives in shared memory until the write ends: free it, then end the group.
        sm = getattr(writer, "metadata_sm", None)
        with contextlib.suppress(Exception):
            sm.unlink()
        os.killpg(os.getpgrp(), signal.SIGKILL)

    signal.signal(signal.SIGTERM, stop)
    ffcv.writer.tqdm = lambda total: progress_bar(progress, total=total, desc=desc, unit="img", file=bar_file)
    writer.from_indexed_dataset(samples)


