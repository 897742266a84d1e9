"""The Ray backend: the reference loader's stream, bit for bit, from Ray tasks on a 2-node loopback
cluster and from a local Ray under torchrun; worker deaths, new cache generations, bad input.

One 2-node cluster (``ray.cluster_utils.Cluster``, 1 CPU a node, 127.0.0.1) serves the module;
every Ray process a test starts is gone when it ends.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from backmix.cam_cache import ArrayMaps
from backmix.cli import main as cli_main
from backmix.osr_data import DecodeError, ImageIndex
from backmix.pipeline import LoaderConfig, ReferenceLoader, make_loader
from backmix.pipeline import ray_loader
from backmix.osr_data.canvas_reads import CanvasDataset

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RAY_DAEMONS = ("raylet", "gcs_server")

# The test's datasets below run inside Ray workers, which cannot import this file: ship them by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


TAG = "BACKMIX_TEST_RAY"    # set in the environment a test's Ray daemons inherit, to find them (and only them)


def ray_daemons(tag: str) -> set[int]:
    """The Ray daemons alive that were started with ``TAG=tag`` in their environment."""
    found = set()
    for p in psutil.process_iter(["name"]):
        try:
            if p.info["name"] in RAY_DAEMONS and p.environ().get(TAG) == tag:
                found.add(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


@pytest.fixture(scope="module")
def cluster():
    """A head and one more node on 127.0.0.1, 1 CPU each, joined by this process."""
    tag = f"cluster-{os.getpid()}"
    os.environ[TAG] = tag
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                      "node_ip_address": "127.0.0.1"})
    try:
        c.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        c.wait_for_nodes()
        del os.environ[TAG]
        assert ray_daemons(tag), "the daemons of the cluster cannot be told apart"
        # Ray rewrites a loopback address into this machine's network address, where a cluster that
        # listens on loopback alone cannot be reached: keep the loopback address while joining.
        services = ray._private.services
        rewrite, services.resolve_ip_for_localhost = services.resolve_ip_for_localhost, lambda host: host
        try:
            ray.init(address=c.address, _node_ip_address="127.0.0.1")
        finally:
            services.resolve_ip_for_localhost = rewrite
        yield c
    finally:
        os.environ.pop(TAG, None)
        ray.shutdown()
        c.shutdown()
        deadline = time.monotonic() + 30
        while ray_daemons(tag) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not ray_daemons(tag), "the cluster left Ray processes behind"


def config(**kw) -> LoaderConfig:
    base = dict(batch_size=8, canvas=40, crop=32, num_workers=0, seed=0, device="cpu")
    return LoaderConfig(**{**base, **kw})


def random_maps(n: int, seed: int) -> ArrayMaps:
    return ArrayMaps(np.random.default_rng(seed).random((n, 8, 8), dtype=np.float32))


def assert_same_stream(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name in x._fields:
            u, v = getattr(x, name), getattr(y, name)
            assert (u is None and v is None) or torch.equal(u, v), name


def epochs(loader, n: int = 2) -> list:
    out = []
    for epoch in range(n):
        loader.set_epoch(epoch)
        out += list(loader)
    return out


class NodeRecordingDataset(CanvasDataset):
    """The loader's dataset; it also notes which node read each row."""

    def __init__(self, index, canvas, mode, folder: Path, **kw) -> None:
        super().__init__(index, canvas, mode, **kw)
        self.folder = folder

    def __getitem__(self, i: int):
        (self.folder / f"{i}-{ray.get_runtime_context().get_node_id()}").touch()
        return super().__getitem__(i)


class StallsOnce(CanvasDataset):
    """The loader's dataset, but the first read of row ``victim`` writes its worker's pid and stalls."""

    def __init__(self, index, canvas, mode, victim: int, marker: Path, **kw) -> None:
        super().__init__(index, canvas, mode, **kw)
        self.victim, self.marker = victim, marker

    def __getitem__(self, i: int):
        if i == self.victim and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            time.sleep(600)
        return super().__getitem__(i)


IMAGE_CROPS = dict(augment="rrc", canvas_mode="stretch", crop_from="image")   # crops cut from the whole image


@pytest.mark.parametrize("kw", [dict(), dict(clean=False), dict(backmix=False), IMAGE_CROPS,
                                dict(IMAGE_CROPS, backmix=False)])
def test_batches_equal_the_reference_loader_on_two_nodes(cluster, tiny_root, tmp_path, monkeypatch, kw):
    index = ImageIndex.load(tiny_root)
    maps = random_maps(len(index), 0)
    monkeypatch.setattr(ray_loader, "CanvasDataset", lambda idx, canvas, mode, **kw: NodeRecordingDataset(idx, canvas, mode, tmp_path, **kw))
    got = epochs(make_loader("ray", index, config(**kw), maps, prefetch=3))
    assert_same_stream(got, epochs(ReferenceLoader(index, config(**kw), maps)))
    assert len(got) == 6
    nodes = {f.name.split("-", 1)[1] for f in tmp_path.iterdir()}
    assert nodes == {n["NodeID"] for n in ray.nodes() if n["Alive"]} and len(nodes) == 2


def test_a_worker_killed_mid_epoch_costs_a_retry_not_a_batch(cluster, tiny_root, tmp_path, monkeypatch):
    index = ImageIndex.load(tiny_root)
    maps = random_maps(len(index), 1)
    victim = int(ReferenceLoader(index, config(), maps).epoch_sampler.batches(0)[1][0])   # epoch 0, step 1
    marker = tmp_path / "victim-pid"
    monkeypatch.setattr(ray_loader, "CanvasDataset", lambda idx, canvas, mode, **kw: StallsOnce(idx, canvas, mode, victim, marker, **kw))
    killed = []

    def kill_the_stalled_worker():
        while not marker.exists() or not marker.read_text():
            time.sleep(0.05)
        pid = int(marker.read_text())
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_the_stalled_worker, daemon=True)
    killer.start()
    got = epochs(make_loader("ray", index, config(), maps, prefetch=2))
    killer.join(timeout=5)
    assert killed and not psutil.pid_exists(killed[0])
    assert_same_stream(got, epochs(ReferenceLoader(index, config(), maps)))


def test_a_new_cache_generation_is_used_from_the_next_epoch(cluster, tiny_root):
    index = ImageIndex.load(tiny_root)
    first, second = random_maps(len(index), 2).maps, random_maps(len(index), 3).maps

    class SwapsOnRefresh(ArrayMaps):
        """Generation 1 until ``publish``; then ``refresh`` (each epoch's start) switches to generation 2."""
        published = None

        def refresh(self):
            if self.published is not None:
                self.maps, self.generation = self.published, 2
            return self.published is not None

    maps = SwapsOnRefresh(first)
    loader = make_loader("ray", index, config(), maps)
    loader.set_epoch(0)
    epoch0 = list(loader)
    maps.published = second     # a rebuild publishes mid-run; the epoch in progress is done
    loader.set_epoch(1)
    epoch1 = list(loader)

    def reference(m, epoch):
        ref = ReferenceLoader(index, config(), ArrayMaps(m))
        ref.set_epoch(epoch)
        return list(ref)

    assert_same_stream(epoch0, reference(first, 0))
    assert_same_stream(epoch1, reference(second, 1))
    assert not all(torch.equal(a.mixed, b.mixed) for a, b in zip(epoch1, reference(first, 1)))


def test_a_broken_file_stops_with_its_path(cluster, folder_with_a_broken_file):
    loader = make_loader("ray", ImageIndex.load(folder_with_a_broken_file), config())
    with pytest.raises(DecodeError, match=r"broken/dog/000009.png does not decode"):
        list(loader)


def test_a_broken_file_is_skipped_and_counted(cluster, folder_with_a_broken_file):
    index = ImageIndex.load(folder_with_a_broken_file)
    loader = make_loader("ray", index, config(on_error="skip"))
    got = list(loader)
    assert loader.skipped == 1 and 9 not in torch.cat([b.indices for b in got]).tolist()
    assert_same_stream(got, list(ReferenceLoader(index, config(on_error="skip"))))


def test_bench_times_ray_beside_the_reference_loader(cluster, tiny_root):
    from backmix.bench.loader import run_benchmark

    report = run_benchmark(tiny_root, ["reference", "ray"], batches=2, warmup=1, batch_size=8, canvas=40, crop=32,
                           workers=1, device="cpu", n_images=24, prefetch=2)
    rows = {(r["backend"], r["mode"]): r for r in report["results"]}
    assert set(rows) == {(b, m) for b in ("reference", "ray") for m in ("off", "on", "on+clean")}
    epoch = len(ImageIndex.load(tiny_root)) // 8    # full batches of an epoch: the timed window is whole epochs
    assert all(r["images_per_s"] > 0 and r["batches"] == epoch * -(-2 // epoch) for r in rows.values())
    assert {"ray_backmix_vs_reference_backmix", "ray_backmix_clean_vs_reference_backmix_clean"} <= set(report["ratios"])


RANK_SCRIPT = """
import json, sys
import torch, torch.distributed as dist
from backmix.osr_data import ImageIndex
from backmix.pipeline import LoaderConfig, ReferenceLoader, make_loader

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
index = ImageIndex.load(sys.argv[1])
cfg = LoaderConfig(batch_size=5, canvas=40, crop=32, num_workers=1, device="cpu", rank=rank, world_size=world)
ray_loader, reference = make_loader("ray", index, cfg, prefetch=2), ReferenceLoader(index, cfg)
seen = []
for epoch in range(2):
    ray_loader.set_epoch(epoch)
    reference.set_epoch(epoch)
    a, b = list(ray_loader), list(reference)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert all(torch.equal(getattr(x, f), getattr(y, f)) for f in ("canvas", "images", "mixed", "labels",
                                                                         "indices")), (rank, epoch)
    seen.append(torch.cat([x.indices for x in a]).tolist())
everyone = [None] * world
dist.all_gather_object(everyone, seen)
import ray
ray.shutdown()
if rank == 0:
    open(sys.argv[2], "w").write(json.dumps(everyone))
dist.destroy_process_group()
"""


def test_two_torchrun_ranks_each_read_their_own_shard_from_a_local_ray(tiny_root, tmp_path):
    """Each rank starts the embedded Ray (no address) and must equal the reference loader of its rank."""
    from test_trainer import env, free_port

    script, out = tmp_path / "rank.py", tmp_path / "seen.json"
    script.write_text(textwrap.dedent(RANK_SCRIPT))
    tag = f"torchrun-{os.getpid()}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), str(tiny_root), str(out)]
    done = subprocess.run(cmd, cwd=REPO, env={**env(), TAG: tag}, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(out.read_text())      # [rank][epoch] -> dataset indices
    for epoch in range(2):
        shards = [set(seen[r][epoch]) for r in range(2)]
        assert not shards[0] & shards[1]
        assert sorted(seen[0][epoch] + seen[1][epoch]) == list(range(24))
    assert not ray_daemons(tag), "a rank left its Ray behind"


def test_without_ray_the_error_says_how_to_install_it(tiny_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)     # `import ray` now fails as if it were not installed
    rc = cli_main(["show", "--data", str(tiny_root), "--out", str(tmp_path / "s.png"), "--backend", "ray"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1] == "backmix: error: Ray is not installed: pip install 'backmix[ray]'"


def test_an_address_nobody_listens_on_is_one_line(tiny_root, tmp_path, capsys, monkeypatch):
    from test_trainer import free_port

    monkeypatch.setattr(ray, "is_initialized", lambda: False)   # as if the module's cluster were not joined

    address = f"127.0.0.1:{free_port()}"
    rc = cli_main(["show", "--data", str(tiny_root), "--out", str(tmp_path / "s.png"), "--backend", "ray",
                   "--ray-address", address])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith(f"backmix: error: cannot reach the Ray cluster at {address}")


@pytest.mark.parametrize("args, message", [
    (["--backend", "ray", "--ray-address", "not an address"], "--ray-address must be 'auto' or HOST:PORT"),
    (["--backend", "ray", "--prefetch", "0"], "--prefetch must be at least 1, got 0"),
    (["--backend", "reference", "--ray-address", "auto"], "only --backend ray takes --ray-address, not --backend reference"),
    (["--backend", "reference", "--prefetch", "2"], "only --backend ray takes --prefetch, not --backend reference"),
])
def test_bad_ray_options_are_one_line(tiny_root, tmp_path, capsys, args, message):
    rc = cli_main(["bench", "loader", "--data", str(tiny_root), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0]
    rc = cli_main(["show", "--data", str(tiny_root), "--out", str(tmp_path / "s.png"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0]
    rc = cli_main(["train", "--data", str(tiny_root), "--out", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0]
