"""A local Ray goes when the trainer that started it goes, however it goes.

``ray.init`` shuts its processes down at a normal exit, but a trainer killed with -9 leaves Ray's
agents running and listening for a minute or more. The watchdog is a small process in its own
session that holds the read end of a pipe whose write end only the trainer holds: when the trainer
dies the kernel closes it, and the watchdog kills every process of that Ray (the ones it started
and their descendants, noted every second, so the agents are known even after their parent is gone;
they are stopped before they are killed, so that none starts another one in between).
``psutil`` checks each process is still the one noted before signalling it, so a reused pid is safe.
"""
from __future__ import annotations

import os
import subprocess
import sys

WATCH = r"""
import select, sys
import psutil
roots, seen = [int(p) for p in sys.argv[1:]], {}
def note():
    for pid in roots:
        try:
            root = psutil.Process(pid)
            for p in [root] + root.children(recursive=True):
                seen.setdefault(p.pid, p)
        except psutil.Error:
            pass
def each(action):
    for p in list(seen.values()):
        try:
            getattr(p, action)()
        except psutil.Error:
            pass
while not select.select([sys.stdin], [], [], 1.0)[0]:
    note()
note()
each("suspend")   # frozen, none of them starts another process: the note is then complete
note()
each("suspend")
each("kill")
"""

_WRITE_ENDS: list[int] = []   # held open for this process's lifetime: their closing is the signal


def guard_local_ray(ray) -> None:
    """Start the watchdog of the local Ray this process just started."""
    node = ray._private.worker._global_node
    pids = [info.process.pid for infos in node.all_processes.values() for info in infos if info.process]
    read, write = os.pipe()
    subprocess.Popen([sys.executable, "-c", WATCH, *map(str, pids)], stdin=read, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True)
    os.close(read)
    _WRITE_ENDS.append(write)
