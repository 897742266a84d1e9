"""The foreground cache: CAMs, generations with momentum, zero-copy reads, crash safety, shards, errors."""
from __future__ import annotations

import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from torch import nn

from cam_cache import (ForegroundCache, build_generation, build_model, class_activation_maps, init_cache,
                       publish_generation, save_checkpoint)
from cam_cache.store import generation_path, read_pointer, write_maps, write_pointer
from osr_data import BackMixError, ImageIndex

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
ROWS = np.arange(0, 1257, 7)       # a spread-out subset keeps the builds quick


@pytest.fixture(scope="module")
def index(digits_root) -> ImageIndex:
    return ImageIndex.load(digits_root / "train")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("cnn32", 10, width=0.25)


def build(cache, model, index, **kw):
    return build_generation(cache, model, index, canvas=40, mean=MEAN, std=STD, rows=ROWS, num_workers=0,
                            progress=False, **kw)


# --- CAMs ---------------------------------------------------------------------------------------

def test_cam_equals_hand_computation():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(3, 5, 4, 4))
    w = rng.normal(size=(7, 5))
    labels = np.array([2, 0, 6])
    got = class_activation_maps(torch.tensor(feats), torch.tensor(w), torch.tensor(labels), grid=4, canvas=4)
    for b in range(3):
        cam = np.zeros((4, 4))
        for c in range(5):
            cam += w[labels[b], c] * feats[b, c]
        cam = (cam - cam.min()) / (cam.max() - cam.min())
        np.testing.assert_allclose(got[b].numpy(), cam, atol=1e-6)


def test_cam_pools_to_the_grid_and_flat_maps_are_half():
    feats = torch.zeros(2, 3, 2, 2)
    feats[0, 0, 0, 0] = 1.0                       # top-left quarter hot
    w = torch.eye(3)
    got = class_activation_maps(feats, w, torch.tensor([0, 1]), grid=4, canvas=8)
    assert got.shape == (2, 4, 4)
    assert got[0, 0, 0] > got[0, 3, 3] and got[0].min() >= 0 and got[0].max() <= 1
    assert torch.all(got[1] == 0.5)               # a flat CAM says nothing: generation 0's value


def test_model_without_cam_head_is_refused(tmp_path, index):
    init_cache(tmp_path / "c", index)
    odd = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(10))
    with pytest.raises(BackMixError, match="cannot take CAMs"):
        build(tmp_path / "c", odd, index)


# --- generations ----------------------------------------------------------------------------------

def test_generation_zero_is_half_and_momentum_follows_the_formula(tmp_path, index, model):
    from cam_cache import compute_cams
    cache = init_cache(tmp_path / "c", index)
    assert cache.generation == 0 and len(cache) == len(index)
    assert np.all(cache.gather(np.arange(len(index))) == 0.5)
    cams = compute_cams(model, index, ROWS, index.labels[ROWS], canvas=40, grid=8, mean=MEAN, std=STD,
                        num_workers=0, progress=False)
    assert build(tmp_path / "c", model, index, momentum=0.1) == 1
    assert build(tmp_path / "c", model, index, momentum=0.1) == 2
    assert cache.refresh() and cache.generation == 2
    # float16 storage: each generation rounds once (relative error 2**-11).
    g1 = np.float16(0.9 * 0.5 + 0.1 * cams).astype(np.float32)
    g2 = 0.9 * g1 + 0.1 * cams
    np.testing.assert_allclose(cache.gather(ROWS), g2, atol=2e-3)
    others = np.setdiff1d(np.arange(len(index)), ROWS)
    assert np.all(cache.gather(others) == 0.5)    # rows not rebuilt keep their maps
    meta = cache.meta
    assert meta["generation"] == "2" and meta["dataset"] == index.fingerprint() and meta["grid"] == "8"


def test_old_generations_are_pruned_to_keep(tmp_path, index, model):
    init_cache(tmp_path / "c", index, keep=2)
    for _ in range(3):
        build(tmp_path / "c", model, index)
    assert sorted(p.name for p in (tmp_path / "c").glob("gen-*.arrow")) == ["gen-000002.arrow", "gen-000003.arrow"]


# --- reads --------------------------------------------------------------------------------------

def _big_cache(folder: Path, rows: int) -> None:
    folder.mkdir()
    maps = np.random.default_rng(0).random((rows, 8, 8), dtype=np.float32).astype(np.float16)
    write_maps(generation_path(folder, 0), np.arange(rows), np.zeros(rows, int), maps,
               {"generation": 0, "momentum": 0, "checkpoint": "", "dataset": "x"})
    write_pointer(folder, 0, keep=3)


def _anonymous_rss() -> int:
    """Resident anonymous memory (bytes): where a copy of the file would land. File pages the
    memory map faults in are the page cache, shared, and not counted here."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def test_reads_are_zero_copy(tmp_path):
    rows = 600_000                                   # ~77 MB of maps
    _big_cache(tmp_path / "big", rows)
    rss, anon = psutil.Process().memory_info().rss, _anonymous_rss()
    cache = ForegroundCache(tmp_path / "big")
    assert psutil.Process().memory_info().rss - rss < 10_000_000     # opening reads no rows
    out = cache.gather(np.random.default_rng(1).integers(0, rows, 256))
    grown = _anonymous_rss() - anon
    assert out.shape == (256, 8, 8) and out.dtype == np.float32
    assert grown < 10_000_000, f"opening and reading a 77 MB cache copied {grown / 1e6:.1f} MB"
    assert not cache.maps.flags.owndata and not cache.maps.flags.writeable   # a view of the mmap


def test_cache_pickles_and_reopens(tmp_path, index, model):
    cache = init_cache(tmp_path / "c", index)
    build(tmp_path / "c", model, index)
    cache.refresh()
    clone = pickle.loads(pickle.dumps(cache))
    assert clone.generation == 1 and np.array_equal(clone.gather(ROWS), cache.gather(ROWS))


# --- safety -------------------------------------------------------------------------------------

BUILD_SCRIPT = """
import sys, numpy as np
from cam_cache import build_generation, build_model, init_cache
from osr_data import ImageIndex
import torch
torch.manual_seed(0)
index = ImageIndex.load(sys.argv[1])
build_generation(sys.argv[2], build_model("cnn32", 10, width=0.25), index, canvas=40, mean=(0.5,)*3,
                 std=(0.25,)*3, num_workers=0, progress=False)
"""


def test_sigkill_mid_build_leaves_previous_generation_and_rerun_finishes(tmp_path, digits_root, index):
    cache_dir = tmp_path / "c"
    cache = init_cache(cache_dir, index)
    before = cache.gather(np.arange(len(index))).copy()
    cmd = [sys.executable, "-c", BUILD_SCRIPT, str(digits_root / "train"), str(cache_dir)]
    killed = 0
    for delay in (3.0, 3.8, 4.6):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed += 1
        proc.wait()
        if read_pointer(cache_dir)["generation"] != 0:
            break
        # Killed before publishing: generation 0 is current and intact.
        fresh = ForegroundCache(cache_dir, index=index)
        assert fresh.generation == 0 and np.array_equal(fresh.gather(np.arange(len(index))), before)
    assert killed >= 1
    if read_pointer(cache_dir)["generation"] == 0:
        subprocess.run(cmd, check=True)
    fresh = ForegroundCache(cache_dir, index=index)
    assert fresh.generation == 1
    assert not list(cache_dir.glob("next-*")) and not list(cache_dir.glob(".*tmp*"))


def assert_same_maps(one: ForegroundCache, two: ForegroundCache) -> None:
    """Row for row: same dataset rows in the same order, same maps. A shard convolves other batch
    compositions, which may move a float32 CAM by an ulp and its float16 rounding by one step."""
    assert np.array_equal(one._mapped.rows, two._mapped.rows)
    assert np.array_equal(np.asarray(one._mapped.labels), np.asarray(two._mapped.labels))
    np.testing.assert_allclose(np.asarray(one.maps, np.float32), np.asarray(two.maps, np.float32), atol=1e-3, rtol=0)


def test_two_shards_equal_one_process(tmp_path, index, model):
    init_cache(tmp_path / "one", index)
    init_cache(tmp_path / "two", index)
    assert build(tmp_path / "one", model, index) == 1
    assert build(tmp_path / "two", model, index, shard=(1, 2)) is None    # half done: not published
    assert ForegroundCache(tmp_path / "two").generation == 0
    assert build(tmp_path / "two", model, index, shard=(0, 2)) == 1
    one, two = ForegroundCache(tmp_path / "one"), ForegroundCache(tmp_path / "two")
    assert_same_maps(one, two)


def test_two_concurrent_processes_equal_one(tmp_path, digits_root, model):
    """Two `--shard k/2` processes at once: both race to publish, one generation results."""
    ckpt = save_checkpoint(tmp_path / "m.pt", model, arch="cnn32", num_classes=10, model_kwargs={"width": 0.25})
    cmd = lambda cache, shard: [sys.executable, "-m", "backmix", "-q", "cache", "build", "--data",
                                str(digits_root / "train"), "--checkpoint", str(ckpt), "--cache", str(cache),
                                "--shard", shard, "--workers", "0", "--no-progress"]
    procs = [subprocess.Popen(cmd(tmp_path / "two", s), stderr=subprocess.PIPE, text=True) for s in ("0/2", "1/2")]
    assert subprocess.run(cmd(tmp_path / "one", "0/1"), capture_output=True).returncode == 0
    for p in procs:
        assert p.wait() == 0, p.stderr.read()
    one, two = ForegroundCache(tmp_path / "one"), ForegroundCache(tmp_path / "two")
    assert one.generation == two.generation == 1
    assert_same_maps(one, two)


def test_finished_shard_is_not_recomputed(tmp_path, index, model, monkeypatch):
    init_cache(tmp_path / "c", index)
    build(tmp_path / "c", model, index, shard=(0, 2), checkpoint_digest="a")
    import cam_cache.precompute as pre
    monkeypatch.setattr(pre, "compute_cams", lambda *a, **k: pytest.fail("shard 0 was recomputed"))
    with pytest.raises(pytest.fail.Exception):
        build(tmp_path / "c", model, index, shard=(1, 2), checkpoint_digest="a")
    monkeypatch.undo()
    assert build(tmp_path / "c", model, index, shard=(1, 2), checkpoint_digest="a") == 1


def test_shard_count_mismatch_errs(tmp_path, index, model):
    init_cache(tmp_path / "c", index)
    build(tmp_path / "c", model, index, shard=(0, 3))
    with pytest.raises(BackMixError, match="3 shards, this one has 2"):
        build(tmp_path / "c", model, index, shard=(0, 2))
    with pytest.raises(BackMixError, match="not complete"):
        publish_generation(tmp_path / "c")


# --- bad input ------------------------------------------------------------------------------------

def test_wrong_dataset_or_grid_errs(tmp_path, index, tiny_root):
    init_cache(tmp_path / "c", index)
    with pytest.raises(BackMixError, match="another data set"):
        ForegroundCache(tmp_path / "c", index=ImageIndex.load(tiny_root))
    with pytest.raises(BackMixError, match="another data set"):
        init_cache(tmp_path / "c", ImageIndex.load(tiny_root))
    with pytest.raises(BackMixError, match="expected 4x4"):
        ForegroundCache(tmp_path / "c", grid=4)


def test_truncated_and_foreign_files_err(tmp_path, index):
    init_cache(tmp_path / "c", index)
    path = generation_path(tmp_path / "c", 0)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BackMixError, match="truncated or not an Arrow cache"):
        ForegroundCache(tmp_path / "c")
    import pyarrow as pa
    with pa.ipc.new_file(str(path), pa.schema([("x", pa.int64())])) as w:
        w.write_batch(pa.record_batch([pa.array([1, 2])], names=["x"]))
    with pytest.raises(BackMixError, match="not written by backmix"):
        ForegroundCache(tmp_path / "c")
    with pytest.raises(BackMixError, match="not a foreground cache"):
        ForegroundCache(tmp_path / "nothing")


def test_cli_build_and_info(tmp_path, digits_root, model):
    ckpt = save_checkpoint(tmp_path / "m.pt", model, arch="cnn32", num_classes=10, model_kwargs={"width": 0.25})
    run = lambda *a: subprocess.run([sys.executable, "-m", "backmix", *a], capture_output=True, text=True)
    r = run("cache", "build", "--data", str(digits_root / "train"), "--checkpoint", str(ckpt),
            "--cache", str(tmp_path / "c"), "--shard", "0/1", "--workers", "0", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "generation 1 published" in r.stdout
    r = run("cache", "info", "--cache", str(tmp_path / "c"), "--json")
    import json
    info = json.loads(r.stdout)
    assert info["generation"] == 1 and info["rows"] == 1257 and info["grid"] == 8
    r = run("cache", "build", "--data", str(digits_root / "train"), "--checkpoint", str(ckpt),
            "--cache", str(tmp_path / "c"), "--shard", "2/1")
    assert r.returncode == 2 and r.stderr.startswith("backmix: error: --shard 2/1")
