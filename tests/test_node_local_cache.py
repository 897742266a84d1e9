"""Cache folders local to each node (``cam_cache/node_folders.py``): two gloo ranks as two nodes of one process
each, each with a --cache folder of its own: started by ``torchrun --nnodes 2`` (c10d on loopback), and, where a
test needs to know which node is rank 0, with torchrun's variables set by hand (RANK, LOCAL_RANK 0, GROUP_RANK)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Each rank runs the CLI with chunks of 1000 bytes, so even the tiny generation files travel in many.
RANK_MAIN = """
import sys
import backmix.cam_cache.node_folders as node_folders
node_folders.CHUNK_BYTES = 1000
from backmix.cli import main
sys.exit(main(sys.argv[1:]))
"""

# Rank 0's publish fails (after the epoch's checkpoint, as a kill there would leave it).
CUT_BEFORE_PUBLISH = """
import os, sys
import backmix.cam_cache.precompute as pre
from backmix.osr_data.errors import BackMixError

def cut(*args, **kwargs):
    raise BackMixError("cut before the publish")

if os.environ["RANK"] == "0":
    pre.publish_generation = cut
""" + RANK_MAIN


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(root: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return ["-q", "train", "--data", str(root), "--out", str(out), "--cache", str(cache), "--epochs", "2",
            "--width", "0.25", "--batch-size", "8", "--lr", "0.05", "--known", "ant,cat", "--workers", "0",
            "--device", "cpu", "--regen-every", "1", "--no-progress", *extra]


def two_nodes(args_of, logs: Path, script: str = RANK_MAIN) -> list[tuple[int, str]]:
    """(exit status, stderr) of ranks 0 and 1, each its own node, run at once (``script`` with the
    arguments ``args_of(rank)``)."""
    port, procs = str(free_port()), []
    logs.mkdir(parents=True, exist_ok=True)
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": "0", "GROUP_RANK": str(rank),
               "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
        with open(logs / f"rank{rank}.err", "w") as err:
            procs.append(subprocess.Popen([sys.executable, "-c", script, *args_of(rank)], cwd=REPO, env=env,
                                          stdout=subprocess.DEVNULL, stderr=err))
    wait_all(procs)
    return [(p.returncode, (logs / f"rank{r}.err").read_text()) for r, p in enumerate(procs)]


def wait_all(procs: list, seconds: float = 240) -> None:
    """Wait for every process; kill those still running after ``seconds`` in all."""
    deadline = time.monotonic() + seconds
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def two_torchrun_nodes(args_of, logs: Path) -> list[tuple[int, str]]:
    """(exit status, stderr) of two ``torchrun --nnodes 2`` agents on this machine, one process each, that
    meet through c10d's rendezvous on loopback (which node's process becomes rank 0 is the rendezvous's
    choice); node n runs the CLI with ``args_of(n)``."""
    port, procs = str(free_port()), []
    logs.mkdir(parents=True, exist_ok=True)
    script = logs / "rank_main.py"
    script.write_text(RANK_MAIN)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    for node in (0, 1):
        with open(logs / f"node{node}.err", "w") as err:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                 "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "node-local",
                 "--max-restarts", "0", "--monitor-interval", "0.5", str(script), *args_of(node)],
                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err))
    wait_all(procs)
    return [(p.returncode, (logs / f"node{n}.err").read_text()) for n, p in enumerate(procs)]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def shared_run(small_root, tmp_path_factory) -> Path:
    """The reference: the same two ranks on one folder both see (--cache-layout auto finds it shared)."""
    tmp = tmp_path_factory.mktemp("shared")
    done = two_nodes(lambda r: train_args(small_root, tmp / "run", tmp / "cache"), tmp / "logs")
    assert [rc for rc, _ in done] == [0, 0], done
    return tmp


def assert_same_as_shared(run: Path, folders: list[Path], shared: Path) -> None:
    """Every node folder ends with the shared folder's files, byte for byte, and nothing else (no shard,
    token or temporary); the metrics and final weights are the shared run's, bit for bit."""
    for folder in (*folders, shared / "cache"):
        assert json.loads((folder / "CURRENT").read_text())["generation"] == 1
        names = sorted(p.name for p in folder.iterdir() if p.name != ".publish.lock")
        assert names == ["CURRENT", "gen-000001.arrow"], (folder, names)
        assert (folder / "gen-000001.arrow").read_bytes() == (shared / "cache" / "gen-000001.arrow").read_bytes()
    a, b = read_jsonl(run / "metrics.jsonl"), read_jsonl(shared / "run" / "metrics.jsonl")
    assert [r["cache_generation"] for r in a] == [0, 1] and a[0]["regenerated"] == 1
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "train_acc", "images", "cache_generation", "eval"):
            assert ra[key] == rb[key], (ra["epoch"], key)
    assert a[-1]["weight_digests"] == b[-1]["weight_digests"] and len(set(a[-1]["weight_digests"])) == 1
    wa = torch.load(run / "last.pt", weights_only=False)["state_dict"]
    wb = torch.load(shared / "run" / "last.pt", weights_only=False)["state_dict"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_node_local_folders_end_with_the_shared_runs_bytes_and_results(small_root, tmp_path, shared_run):
    """Two torchrun nodes, each with a --cache folder of its own: --cache-layout auto finds them apart, rank 1's
    shard reaches rank 0, rank 0 publishes, and the other node's folder gets the same generation file, byte
    for byte; the run equals one on a shared folder, bit for bit."""
    local = two_torchrun_nodes(lambda n: train_args(small_root, tmp_path / "run", tmp_path / f"node{n}"),
                               tmp_path / "logs")
    assert [rc for rc, _ in local] == [0, 0], local
    assert_same_as_shared(tmp_path / "run", [tmp_path / "node0", tmp_path / "node1"], shared_run)


def test_a_node_local_rebuild_cut_before_its_publish_is_published_on_resume(small_root, tmp_path, shared_run):
    """Rank 0's publish fails after the epoch's checkpoint: both ranks end with its one line, the shards stay
    staged (rank 1's in its folder and, sent, in rank 0's); --resume publishes them on both nodes and goes on
    as the unbroken run on a shared folder."""
    def args(r: int) -> list[str]:
        return train_args(small_root, tmp_path / "run", tmp_path / f"node{r}", "--cache-layout", "node-local")

    cut = two_nodes(args, tmp_path / "cut", script=CUT_BEFORE_PUBLISH)
    for rc, err in cut:
        assert rc == 2 and "failed on rank 0: cut before the publish" in err, err
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    assert sorted(p.name for p in (node0 / "next-000001").iterdir()) == ["shard-0-of-2.arrow", "shard-1-of-2.arrow"]
    assert sorted(p.name for p in (node1 / "next-000001").iterdir()) == ["shard-1-of-2.arrow"]
    assert [json.loads((f / "CURRENT").read_text())["generation"] for f in (node0, node1)] == [0, 0]
    resumed = two_nodes(lambda r: [*args(r), "--resume"], tmp_path / "resumed")
    assert [rc for rc, _ in resumed] == [0, 0], resumed
    assert_same_as_shared(tmp_path / "run", [node0, node1], shared_run)


def test_a_shared_layout_that_is_not_shared_is_refused_on_every_rank(small_root, tmp_path):
    done = two_nodes(lambda r: train_args(small_root, tmp_path / "run", tmp_path / f"node{r}", "--cache-layout",
                                          "shared"), tmp_path / "logs")
    want = (f"backmix: error: --cache-layout shared, but rank 1 does not see rank 0's cache folder "
            f"{tmp_path / 'node0'}: give each node a folder of its own with --cache-layout node-local (or auto)")
    for rc, err in done:
        assert rc == 2 and "Traceback" not in err, err
        assert [line for line in err.splitlines() if line.startswith("backmix: error:")] == [want], err
    assert not (tmp_path / "node1").exists()


def test_a_node_whose_copy_is_damaged_gets_rank_0s_generation_again(small_root, tmp_path):
    """A resumed or new run on node folders: a node's copy that differs from rank 0's generation (here one byte
    of its maps) is replaced at start by rank 0's bytes, CRC-checked, before any rank reads it."""
    import shutil

    from backmix.cam_cache import init_cache
    from backmix.osr_data.index import ImageIndex
    init_cache(tmp_path / "node0", ImageIndex.load(small_root / "train"))    # generation 0 as a file
    shutil.copytree(tmp_path / "node0", tmp_path / "node1")
    damaged = tmp_path / "node1" / "gen-000000.arrow"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    done = two_nodes(lambda r: train_args(small_root, tmp_path / "run", tmp_path / f"node{r}", "--epochs", "1",
                                          "--cache-layout", "node-local"), tmp_path / "logs")
    assert [rc for rc, _ in done] == [0, 0], done
    assert damaged.read_bytes() == (tmp_path / "node0" / "gen-000000.arrow").read_bytes()
    assert (tmp_path / "node1" / "CURRENT").read_text() == (tmp_path / "node0" / "CURRENT").read_text()


def test_a_node_that_cannot_take_the_copy_ends_every_rank_with_its_error(small_root, tmp_path):
    """Rank 1's folder cannot be made (its parent is a file) while rank 0 sends it generation 0: rank 1 still
    reads every chunk, so neither waits on the other, and both end with rank 1's one line."""
    from backmix.cam_cache import init_cache
    from backmix.osr_data.index import ImageIndex
    init_cache(tmp_path / "node0", ImageIndex.load(small_root / "train"))    # a file to send
    (tmp_path / "file").write_text("")
    caches = [tmp_path / "node0", tmp_path / "file" / "node1"]
    done = two_nodes(lambda r: train_args(small_root, tmp_path / "run", caches[r], "--cache-layout", "node-local"),
                     tmp_path / "logs")
    want = (f"backmix: error: cache rebuild in {caches[1]} failed on rank 1: cannot create cache folder "
            f"{caches[1]}: Not a directory")
    for rc, err in done:
        assert rc == 2 and "Traceback" not in err, err
        assert [line for line in err.splitlines() if line.startswith("backmix: error:")] == [want], err
