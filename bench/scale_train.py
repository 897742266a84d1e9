"""``backmix bench scale``'s bounded training run: ``backmix train`` as a user starts it, stopped after N steps.

The command runs in a child process (its own session) with ``--log-every 1``. Its "first batch in
hand" line marks the first batch (the seconds include the interpreter, the imports, the index, the
foreground cache and the loaders: what a user waits for) and its first step's line the end of the
first optimizer step (the model's first forward and backward on top). After ``steps`` step lines
the child gets SIGINT (the trainer's Ctrl-C) and is waited for; on any error or a Ctrl-C of the
bench itself the child's whole process group is stopped too, so no worker outlives the bench.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from backmix.osr_data.errors import BackMixError
from backmix.trainers.run_log import FIRST_BATCH_LINE

log = logging.getLogger("backmix")

STEP_LINE = re.compile(r"epoch 1/\d+ step (\d+)/(\d+)")
STOP_GRACE_S = 30.0    # after SIGINT, seconds the trainer gets to close its workers before SIGKILL


def stop_group(proc: subprocess.Popen) -> None:
    """SIGINT to the child's process group, then SIGKILL if it has not ended after ``STOP_GRACE_S``."""
    for sig in (signal.SIGINT, signal.SIGKILL):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


def bounded_train(args: list[str], steps: int, memory, started: str = "") -> dict:
    """Run ``backmix train ARGS --log-every 1`` until its ``steps``-th step (or its end); ``memory`` (a
    ``MemoryPeaks``) samples it and its workers meanwhile; ``started`` is logged once the child is
    started and in the hands of the cleanup below. Returns the seconds to the first batch and to the
    end of the first step, the steps seen and the wall time."""
    command = [sys.executable, "-m", "backmix", "train", *args, "--log-every", "1", "--no-progress"]
    seen, first, first_step, tail = 0, None, None, []
    with memory.sampling():
        t = time.perf_counter()
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            if started:
                log.info(started)
            for line in proc.stderr:
                tail = (tail + [line.rstrip()])[-5:]
                if first is None and FIRST_BATCH_LINE in line:
                    first = time.perf_counter() - t
                match = STEP_LINE.search(line)
                if match:
                    seen = int(match.group(1))
                    first_step = time.perf_counter() - t if first_step is None else first_step
                    if seen >= steps:
                        break
        finally:
            stop_group(proc)
        wall = time.perf_counter() - t
    if first is None or first_step is None:
        raise BackMixError(f"the training run ended (exit {proc.returncode}) before its first step: "
                           + " | ".join(tail))
    return {"first_batch_s": first, "first_step_s": first_step, "steps": seen, "wall_s": wall,
            "command": " ".join(["backmix", "train", *args])}


def train_args(root: Path, run: Path, cache: Path, *, batch_size: int, canvas: int, crop: int,
               workers: int) -> list[str]:
    return ["--data", str(root), "--out", str(run), "--cache", str(cache), "--epochs", "1",
            "--batch-size", str(batch_size), "--canvas", str(canvas), "--crop", str(crop), "--workers", str(workers)]
