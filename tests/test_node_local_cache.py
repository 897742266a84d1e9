"""Cache folders local to each node (``cam_cache/node_folders.py``): two gloo ranks started as two torchrun
nodes of one process each (RANK, LOCAL_RANK 0, GROUP_RANK set by hand), each with a --cache folder of its own."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(root: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return ["-q", "train", "--data", str(root), "--out", str(out), "--cache", str(cache), "--epochs", "2",
            "--width", "0.25", "--batch-size", "8", "--lr", "0.05", "--known", "ant,cat", "--workers", "0",
            "--device", "cpu", "--regen-every", "1", "--no-progress", *extra]


def two_nodes(args_of, logs: Path) -> list[tuple[int, str]]:
    """(exit status, stderr) of ranks 0 and 1, each its own node, run at once."""
    port, procs = str(free_port()), []
    logs.mkdir(parents=True, exist_ok=True)
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": "0", "GROUP_RANK": str(rank),
               "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
        with open(logs / f"rank{rank}.err", "w") as err:
            procs.append(subprocess.Popen([sys.executable, "-c", RANK_MAIN, *args_of(rank)], cwd=REPO, env=env,
                                          stdout=subprocess.DEVNULL, stderr=err))
    deadline = time.monotonic() + 240
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, (logs / f"rank{r}.err").read_text()) for r, p in enumerate(procs)]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_node_local_folders_end_with_the_shared_runs_bytes_and_results(small_root, tmp_path):
    """--cache-layout auto finds two folders of their own: rank 1's shard reaches rank 0, rank 0 publishes, and
    rank 1's folder gets the same generation file, byte for byte; the run equals one on a shared folder."""
    local = two_nodes(lambda r: train_args(small_root, tmp_path / "local", tmp_path / f"node{r}"), tmp_path / "a")
    assert [rc for rc, _ in local] == [0, 0], local
    shared = two_nodes(lambda r: train_args(small_root, tmp_path / "shared", tmp_path / "one"), tmp_path / "b")
    assert [rc for rc, _ in shared] == [0, 0], shared

    node0, node1, one = tmp_path / "node0", tmp_path / "node1", tmp_path / "one"
    for folder in (node0, node1, one):
        assert json.loads((folder / "CURRENT").read_text())["generation"] == 1
        names = sorted(p.name for p in folder.iterdir() if p.name != ".publish.lock")
        assert names == ["CURRENT", "gen-000001.arrow"], (folder, names)    # no shard, token or temporary left
    assert (node1 / "gen-000001.arrow").read_bytes() == (node0 / "gen-000001.arrow").read_bytes() \
        == (one / "gen-000001.arrow").read_bytes()

    a, b = read_jsonl(tmp_path / "local" / "metrics.jsonl"), read_jsonl(tmp_path / "shared" / "metrics.jsonl")
    assert [r["cache_generation"] for r in a] == [0, 1] and a[0]["regenerated"] == 1
    for ra, rb in zip(a, b):
        for key in ("loss", "train_acc", "images", "cache_generation", "eval"):
            assert ra[key] == rb[key], (ra["epoch"], key)
    assert a[-1]["weight_digests"] == b[-1]["weight_digests"] and len(set(a[-1]["weight_digests"])) == 1
    wa = torch.load(tmp_path / "local" / "last.pt", weights_only=False)["state_dict"]
    wb = torch.load(tmp_path / "shared" / "last.pt", weights_only=False)["state_dict"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


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
