"""The foreground cache: CAMs, generations with momentum, zero-copy reads, crash safety, shards, errors."""
from __future__ import annotations

import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from torch import nn

from backmix.cam_cache import ForegroundCache, build_generation, class_activation_maps, init_cache, publish_generation
from backmix.cam_cache.generation_file import write_maps
from backmix.cam_cache.store import generation_path, write_pointer
from backmix.models import build_model, save_checkpoint
from backmix.osr_data import BackMixError, ImageIndex

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


@pytest.mark.parametrize("h,canvas,grid", [(7, 224, 8), (2, 40, 8), (5, 40, 4), (3, 50, 7)])
def test_cam_pooling_is_bilinear_upsampling_then_average_pooling(h, canvas, grid):
    """The one-matrix pooling equals upsampling to the canvas and adaptive average pooling to the grid."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(h)
    feats, w, y = torch.randn(4, 6, h, h, generator=g), torch.randn(3, 6, generator=g), torch.tensor([0, 1, 2, 1])
    cam = torch.einsum("bchw,bc->bhw", feats.double(), w.double()[y])
    lo, hi = cam.amin((1, 2), keepdim=True), cam.amax((1, 2), keepdim=True)
    up = F.interpolate(((cam - lo) / (hi - lo))[:, None], size=(canvas, canvas), mode="bilinear",
                       align_corners=False)
    expected = F.adaptive_avg_pool2d(up, grid)[:, 0]
    got = class_activation_maps(feats, w, y, grid=grid, canvas=canvas)
    assert got.dtype == torch.float32 and got.shape == (4, grid, grid)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=0)   # float32 vs float64 reference


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
    from backmix.cam_cache import compute_cams
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
               {"generation": 0, "momentum": 0, "checkpoint": "", "dataset": "x", "canvas_mode": "center"})
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
    anon = _anonymous_rss()
    cache = ForegroundCache(tmp_path / "big")   # checks the file's CRC: one pass over its pages, no copy
    # A worker reopening the generation its parent verified maps it and reads no rows.
    rss = psutil.Process().memory_info().rss
    reopened = pickle.loads(pickle.dumps(cache))
    assert len(reopened.rows) == rows and psutil.Process().memory_info().rss - rss < 10_000_000
    del reopened
    out = cache.gather(np.random.default_rng(1).integers(0, rows, 256))
    grown = _anonymous_rss() - anon
    assert out.shape == (256, 8, 8) and out.dtype == np.float32
    assert grown < 10_000_000, f"opening and reading a 77 MB cache copied {grown / 1e6:.1f} MB"
    assert not cache.maps.flags.owndata and not cache.maps.flags.writeable   # a view of the mmap
    import pyarrow as pa
    with pa.memory_map(str(generation_path(tmp_path / "big", 0))) as f:
        mapped = pa.ipc.open_file(f).get_batch(0).column("map").values.buffers()[1]
        # Same bytes, and the view's address lies in a file mapping, not in a heap copy.
        assert bytes(mapped[:64]) == cache.maps.reshape(-1)[:32].tobytes()
    start = cache.maps.__array_interface__["data"][0]
    regions = Path("/proc/self/maps").read_text().splitlines()
    holder = [r for r in regions if int(r.split()[0].split("-")[0], 16) <= start < int(r.split()[0].split("-")[1], 16)]
    assert holder and holder[0].endswith("gen-000000.arrow"), holder


def test_cache_pickles_small_reopens_lazily_and_refreshes(tmp_path, index, model):
    cache = init_cache(tmp_path / "c", index)
    assert cache.refresh() is False                # nothing new: one stat of CURRENT
    build(tmp_path / "c", model, index)
    assert cache.generation == 0 and cache.refresh() is True and cache.generation == 1
    data = pickle.dumps(cache)
    assert len(data) < 2000                        # the folder and expectations, never the maps
    clone = pickle.loads(data)
    assert clone._mapped is None                   # opened on first use, in the worker
    assert clone.generation == 1 and np.array_equal(clone.gather(ROWS), cache.gather(ROWS))
    build(tmp_path / "c", model, index)
    assert clone.refresh() and clone.generation == 2 and len(clone) == len(index)


# --- safety -------------------------------------------------------------------------------------

# Builds generation n+1 of ROWS in a child process that stops right before one rename (the moment a
# file is complete under its temporary name) and says so; the test then SIGKILLs it there. No sleeps
# to guess at: the kill lands exactly between write and rename.
PAUSING_BUILD = """
import os, sys, time
import numpy as np
from backmix.cam_cache import build_generation
from backmix.models import load_model
from backmix.osr_data import ImageIndex

data, cache, ckpt, pause_before = sys.argv[1:5]
rename = os.replace
def paused_replace(src, dst):
    if os.path.basename(str(dst)).startswith(pause_before):
        print("PAUSED", src, flush=True)
        time.sleep(600)
    rename(src, dst)
os.replace = paused_replace
build_generation(cache, load_model(ckpt)[0], ImageIndex.load(data), canvas=40, mean=(0.5,) * 3,
                 std=(0.25,) * 3, rows=np.arange(0, 1257, 7), num_workers=0, progress=False)
"""


def kill_before_rename(digits_root, cache_dir, ckpt, name_prefix: str) -> str:
    proc = subprocess.Popen([sys.executable, "-c", PAUSING_BUILD, str(digits_root / "train"), str(cache_dir),
                             str(ckpt), name_prefix], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("PAUSED"):
        proc.kill()
        pytest.fail(f"the build did not reach the rename of {name_prefix}*: {line} {proc.stderr.read()}")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    return line.split()[1]                      # the complete temporary file left behind


def test_sigkill_between_write_and_rename_keeps_previous_generation(tmp_path, digits_root, index, model):
    assert np.array_equal(ROWS, np.arange(0, 1257, 7))
    ckpt = save_checkpoint(tmp_path / "m.pt", model, arch="cnn32", num_classes=10, model_kwargs={"width": 0.25})
    cache_dir = tmp_path / "c"
    init_cache(cache_dir, index)
    before = ForegroundCache(cache_dir).maps.copy()
    # shard written, not renamed / generation file written, not renamed / generation renamed, CURRENT not moved
    for prefix in ("shard-", "gen-", "CURRENT"):
        left = kill_before_rename(digits_root, cache_dir, ckpt, prefix)
        assert Path(left).is_file()
        fresh = ForegroundCache(cache_dir, index=index, grid=8)
        assert fresh.generation == 0 and np.array_equal(fresh.maps, before), f"killed before {prefix}"
    assert generation_path(cache_dir, 1).is_file()     # complete, but CURRENT never named it
    # The rerun finds the finished shard, publishes, and cleans what the kills left.
    import backmix.cam_cache.precompute as pre
    real = pre.compute_cams
    pre.compute_cams = lambda *a, **k: pytest.fail("the finished shard was recomputed")
    try:
        assert build(cache_dir, model, index) == 1
    finally:
        pre.compute_cams = real
    init_cache(tmp_path / "clean", index)
    assert build(tmp_path / "clean", model, index) == 1
    assert_same_maps(ForegroundCache(cache_dir, index=index), ForegroundCache(tmp_path / "clean"))
    assert sorted(p.name for p in cache_dir.iterdir()) == [".build-0-of-1.lock", ".publish.lock", "CURRENT",
                                                           "gen-000000.arrow", "gen-000001.arrow"]


def assert_same_maps(one: ForegroundCache, two: ForegroundCache) -> None:
    """Row for row: same dataset rows in the same order, same maps. A shard convolves other batch
    compositions, which may move a float32 CAM by an ulp and its float16 rounding by one step."""
    assert np.array_equal(one.rows, two.rows) and np.array_equal(one.rows, np.arange(len(one)))
    assert np.array_equal(one.labels, two.labels)
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


def test_two_concurrent_processes_equal_one(tmp_path, tiny_root):
    """Two `backmix cache build --shard k/2` processes at once: both race to publish, one generation results,
    equal row for row to a 1-process build."""
    from backmix.models import load_model
    from backmix.osr_data.file_digest import file_digest
    from backmix.osr_data.normalize import IMAGENET_MEAN, IMAGENET_STD
    torch.manual_seed(1)
    ckpt = save_checkpoint(tmp_path / "m.pt", build_model("cnn32", 3, width=0.25), arch="cnn32", num_classes=3,
                           model_kwargs={"width": 0.25})
    cmd = lambda shard: [sys.executable, "-m", "backmix", "-q", "cache", "build", "--data", str(tiny_root),
                         "--checkpoint", str(ckpt), "--cache", str(tmp_path / "two"), "--shard", shard,
                         "--workers", "0", "--no-progress"]
    procs = [subprocess.Popen(cmd(s), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for s in ("0/2", "1/2")]
    tiny = ImageIndex.load(tiny_root)
    init_cache(tmp_path / "one", tiny)
    assert build_generation(tmp_path / "one", load_model(ckpt)[0], tiny, canvas=40, mean=IMAGENET_MEAN,
                            std=IMAGENET_STD, num_workers=0, progress=False,
                            checkpoint_digest=file_digest(ckpt)) == 1
    for p in procs:
        assert p.wait() == 0, p.stderr.read()
    one, two = ForegroundCache(tmp_path / "one"), ForegroundCache(tmp_path / "two", index=tiny)
    assert one.generation == two.generation == 1
    assert_same_maps(one, two)
    assert two.meta["checkpoint"] == file_digest(ckpt)


def test_finished_shard_is_not_recomputed(tmp_path, index, model, monkeypatch):
    init_cache(tmp_path / "c", index)
    build(tmp_path / "c", model, index, shard=(0, 2), checkpoint_digest="a")
    import backmix.cam_cache.precompute as pre
    monkeypatch.setattr(pre, "compute_cams", lambda *a, **k: pytest.fail("shard 0 was recomputed"))
    with pytest.raises(pytest.fail.Exception):
        build(tmp_path / "c", model, index, shard=(1, 2), checkpoint_digest="a")
    monkeypatch.undo()
    assert build(tmp_path / "c", model, index, shard=(1, 2), checkpoint_digest="a") == 1


def test_shard_count_mismatch_errs(tmp_path, index, model):
    init_cache(tmp_path / "c", index)
    build(tmp_path / "c", model, index, shard=(0, 3))
    with pytest.raises(BackMixError, match="world size does not match the cache shards: .* 3 shards, "
                                           "this one has 2"):
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


def test_wrong_columns_and_an_earlier_format(tmp_path, index):
    import pyarrow as pa
    from backmix.cam_cache.generation_file import schema
    init_cache(tmp_path / "c", index)
    path = generation_path(tmp_path / "c", 0)
    n = len(index)
    # A backmix-looking file with the wrong map type.
    bad = pa.record_batch([pa.array(np.arange(n)), pa.array(index.labels),
                           pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(n * 64, np.float32)), 64)],
                          schema=pa.schema([("index", pa.int64()), ("label", pa.int64()),
                                            ("map", pa.list_(pa.float32(), 64))],
                                           metadata=schema(8, {"canvas_mode": "center"}).metadata))
    with pa.ipc.new_file(str(path), bad.schema) as w:
        w.write_batch(bad)
    with pytest.raises(BackMixError, match=f"cache file {path} has columns"):
        ForegroundCache(tmp_path / "c")
    # Format 1 (int32 labels, no canvas mode) is an earlier layout: refused, naming the command.
    old = pa.record_batch([pa.array(np.arange(n)), pa.array(index.labels, pa.int32()),
                           pa.FixedSizeListArray.from_arrays(pa.array(np.full(n * 64, 0.25, np.float16)), 64)],
                          schema=pa.schema([("index", pa.int64()), ("label", pa.int32()),
                                            ("map", pa.list_(pa.float16(), 64))],
                                           metadata={"format": "backmix-foreground-cache/1", "grid": "8",
                                                     "dataset": index.fingerprint(), "generation": "0"}))
    with pa.ipc.new_file(str(path), old.schema) as w:
        w.write_batch(old)
    with pytest.raises(BackMixError, match=f"cache file {path} was written by an earlier backmix "
                                           r"\(backmix-foreground-cache/1, no canvas mode\): delete its cache "
                                           "folder; `backmix cache init` rewrites it"):
        ForegroundCache(tmp_path / "c", index=index, grid=8)


def test_stale_shard_of_other_weights_is_recomputed(tmp_path, index, model):
    init_cache(tmp_path / "c", index)
    build(tmp_path / "c", model, index, shard=(0, 2), checkpoint_digest="old")
    shard = tmp_path / "c" / "next-000001" / "shard-0-of-2.arrow"
    assert shard.is_file()
    torch.manual_seed(5)
    other = build_model("cnn32", 10, width=0.25)
    assert build(tmp_path / "c", other, index, shard=(1, 2), checkpoint_digest="new") is None
    assert not shard.exists()                     # shard 0 came from other weights: dropped
    assert build(tmp_path / "c", other, index, shard=(0, 2), checkpoint_digest="new") == 1
    assert ForegroundCache(tmp_path / "c").meta["checkpoint"] == "new"


def test_labels_beyond_the_head_err(tmp_path, index):
    init_cache(tmp_path / "c", index)
    with pytest.raises(BackMixError, match="the model has 3 classes"):
        build(tmp_path / "c", build_model("cnn32", 3, width=0.25), index)


def cli(*argv) -> int:
    from backmix.cli import main
    return main(["-q", *map(str, argv)])


def test_cli_build_info_and_known_classes(tmp_path, tiny_root, capsys):
    import json
    tiny = ImageIndex.load(tiny_root)
    torch.manual_seed(0)
    net = build_model("cnn32", 2, width=0.25)
    ckpt = save_checkpoint(tmp_path / "m.pt", net, arch="cnn32", num_classes=2, model_kwargs={"width": 0.25},
                           known_classes=["cat", "fox"])
    cache = tmp_path / "c"
    assert cli("cache", "init", "--data", tiny_root, "--cache", cache, "--grid", "4", "--keep", "2") == 0
    assert cli("cache", "build", "--data", tiny_root, "--checkpoint", ckpt, "--cache", cache,
               "--workers", "0", "--no-progress") == 0
    assert "generation 1 published" in capsys.readouterr().out
    assert cli("cache", "info", "--cache", cache, "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["generation"], info["rows"], info["grid"], info["keep"]) == (1, 24, 4, 2)
    assert info["generations_on_disk"] == [0, 1] and info["momentum"] == 0.1 and info["bytes_on_disk"] > 0
    maps = ForegroundCache(cache, index=tiny).gather(np.arange(24))
    dog = tiny.labels == tiny.classes.index("dog")
    assert np.all(maps[dog] == 0.5) and not np.all(maps[~dog] == 0.5)   # only the model's classes move
    assert cli("cache", "info", "--cache", cache) == 0
    assert "generation" in capsys.readouterr().out
    # --known must agree with the checkpoint; a checkpoint that names no classes needs it.
    assert cli("cache", "build", "--data", tiny_root, "--checkpoint", ckpt, "--cache", cache,
               "--known", "cat,dog") == 2
    assert "not the classes checkpoint" in capsys.readouterr().err
    bare = save_checkpoint(tmp_path / "bare.pt", net, arch="cnn32", num_classes=2, model_kwargs={"width": 0.25})
    assert cli("cache", "build", "--data", tiny_root, "--checkpoint", bare, "--cache", cache) == 2
    assert "say which with --known" in capsys.readouterr().err
    assert cli("cache", "build", "--data", tiny_root, "--checkpoint", bare, "--cache", cache,
               "--known", "fox,cat", "--workers", "0", "--no-progress") == 0
    assert ForegroundCache(cache).generation == 2
    assert cli("cache", "build", "--data", tiny_root, "--checkpoint", ckpt, "--cache", cache, "--shard", "2/1") == 2
    assert capsys.readouterr().err.startswith("backmix: error: --shard 2/1")
    assert cli("cache", "info", "--cache", tmp_path / "none") == 2
    assert "not a foreground cache" in capsys.readouterr().err


def test_in_loop_rows_plus_a_pass_for_the_rest_equal_one_pass(tmp_path, index, model):
    """rebuild_cache: rows fed to the writer as canvases (the training loop's way) are kept, the build's
    other rows are computed by a pass; the generation equals one separate pass over all rows."""
    from backmix.cam_cache import GenerationWriter, rebuild_cache
    from backmix.osr_data.decode import decode_canvas

    init_cache(tmp_path / "pass", index)
    init_cache(tmp_path / "loop", index)
    assert build(tmp_path / "pass", model, index) == 1
    writer = GenerationWriter(tmp_path / "loop", model, index, canvas=40, mean=MEAN, std=STD, rows=ROWS)
    fed = ROWS[::2]
    model.train()
    try:
        for chunk in np.array_split(fed, 5):
            canvases = torch.stack([decode_canvas(index.abspath(int(r)), 40) for r in chunk])
            writer.add_canvases(canvases, torch.from_numpy(chunk))
            assert model.training                      # the training loop's mode is left as it was
        with pytest.raises(BackMixError, match="a row twice"):
            writer.add(fed[:1], np.zeros((1, 8, 8), np.float32))
        assert np.array_equal(writer.done_rows, fed)
        assert rebuild_cache(tmp_path / "loop", model, index, canvas=40, mean=MEAN, std=STD, rows=ROWS,
                             writer=writer, num_workers=0, progress=False) == 1
    finally:
        model.eval()
    assert_same_maps(ForegroundCache(tmp_path / "pass"), ForegroundCache(tmp_path / "loop", index=index))
    assert not (tmp_path / "loop" / "next-000001").exists()
