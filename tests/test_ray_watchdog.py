"""A local Ray started by ``--backend ray`` goes with the trainer, even one killed with -9."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

pytest.importorskip("ray", reason="the ray backend needs ray")

STARTS_RAY = """
import json, time, psutil
from backmix.pipeline.ray_loader import join_ray
ray = join_ray(None, 1)
node = ray._private.worker._global_node
time.sleep(5)   # let the agents come up
pids = []
for infos in node.all_processes.values():
    for info in infos:
        p = psutil.Process(info.process.pid)
        pids += [q.pid for q in [p] + p.children(recursive=True)]
print(json.dumps(pids), flush=True)
time.sleep(600)
"""


def listening_pids() -> set[int]:
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    return {int(part.split("pid=")[1].split(",")[0]) for part in out.split() if "pid=" in part}


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2; scripts/install.sh installs it)")
def test_no_process_of_a_local_ray_outlives_a_trainer_killed_with_sigkill():
    proc = subprocess.Popen([sys.executable, "-c", STARTS_RAY], stdout=subprocess.PIPE, text=True)
    try:
        pids = json.loads(proc.stdout.readline())
        assert len(pids) >= 3 and listening_pids() & set(pids)   # GCS, raylet, agents: some listen
        started = {pid: psutil.Process(pid).create_time() for pid in pids}
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def alive() -> list[int]:
        out = []
        for pid, t in started.items():
            try:
                if psutil.Process(pid).create_time() == t:
                    out.append(pid)
            except psutil.NoSuchProcess:
                pass
        return out
    deadline = time.monotonic() + 30
    while alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert alive() == [] and not listening_pids() & set(pids)
