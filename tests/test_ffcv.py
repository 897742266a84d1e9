"""The FFCV loader: the reference loader's stream, exactly, from a raw-mode .beton at the canvas
size; the kernel, exactly, on FFCV's own canvases otherwise.

FFCV compiles its pipeline with numba when a loader first runs (seconds), so the tests share one
BackMix loader and build only the few others they need; the CLI runs in-process.
"""
from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest
import torch

from backmix.cli import main as backmix_main
from backmix.cam_cache.maps import UniformMaps
from backmix.osr_data import BackMixError, ImageIndex
from backmix.pipeline import LoaderConfig, ReferenceLoader, crop_flip, fill_value, make_loader, normalize
from backmix.pipeline.backmix import backmix
from backmix.pipeline.beton import write_beton
from backmix.pipeline.beton_location import find_beton

ROWS = np.arange(0, 1257, 5)          # 252 images: 5 batches of 50 and a short one


class SwappingMaps(UniformMaps):
    """Generation 0 until ``publish`` is called; the new maps show after the next ``refresh``."""

    def __init__(self, n: int) -> None:
        super().__init__(n, 8)
        self.arrays = {0: np.full((n, 8, 8), 0.5, np.float32)}
        self.published = 0

    def publish(self, maps: np.ndarray) -> None:
        self.arrays[1], self.published = maps, 1

    def gather(self, indices):
        return self.arrays[self.generation][np.asarray(indices)]

    def refresh(self) -> bool:
        changed = self.published != self.generation
        self.generation = self.published
        return changed


@pytest.fixture(scope="module")
def index(digits_root) -> ImageIndex:
    return ImageIndex.load(digits_root / "train")


@pytest.fixture(scope="module")
def beton(index):
    """The train folder's beton as ``backmix data write-beton`` writes it by default: raw canvases, in a
    folder beside the image folder."""
    assert backmix_main(["data", "write-beton", "--data", str(index.root), "--canvas", "40", "--no-progress"]) == 0
    path = find_beton(index, 40)
    assert path.parent == index.root.parent / ".backmix-betons" and path.name.endswith("-40-center-raw.beton")
    return path


@pytest.fixture(scope="module")
def pair(index, beton):
    """(FFCV loader, reference loader) with the same config, each with its own swappable maps; the FFCV
    loader finds its beton by default (the one loader the tests share: numba compiles it once)."""
    from backmix.pipeline.ffcv import FfcvLoader
    config = LoaderConfig(batch_size=50, num_workers=2, seed=3)
    ffcv = FfcvLoader(index, config, SwappingMaps(len(index)), ROWS)
    assert ffcv.source.beton == beton
    ref = ReferenceLoader(index, config, SwappingMaps(len(index)), ROWS)
    return ffcv, ref


def assert_same_epoch(a_loader, b_loader, epoch: int) -> int:
    a_loader.set_epoch(epoch)
    b_loader.set_epoch(epoch)
    n = 0
    for a, b in zip(a_loader, b_loader, strict=True):
        for field in ("canvas", "images", "mixed", "labels", "indices"):
            x, y = getattr(a, field), getattr(b, field)
            assert (x is None and y is None) or torch.equal(x, y), (epoch, n, field)
            assert x is None or x.is_contiguous()
        n += 1
    return n


def kernel_on_own_canvas(loader, batch, epoch: int, step: int):
    """(clean, mixed) as the torch kernel makes them from the loader's own canvases."""
    cfg = loader.config
    sampler = cfg.sampler()
    p = sampler.draw(len(batch.indices), epoch, step).torch()
    maps = torch.from_numpy(loader.maps.gather(batch.indices.numpy()))
    mixed = backmix(batch.canvas, maps, p["partners"], p["tie_break"], p["boxes"], top_k_ratio=cfg.top_k_ratio,
                    box_hw=sampler.box_hw, fill=fill_value(cfg.mean))
    mean, std = torch.tensor(cfg.mean), torch.tensor(cfg.std)
    return [normalize(crop_flip(x, p["crops"], p["flips"], cfg.crop), mean, std) for x in (batch.canvas, mixed)]


def test_ffcv_stream_equals_the_reference_and_the_kernel(pair):
    """By default (the beton write-beton writes by default, found by default) the stream is the reference's."""
    ffcv, ref = pair
    assert ffcv.source.mix_in == "ffcv" and ffcv.backend == "ffcv"
    assert assert_same_epoch(ffcv, ref, 0) == len(ref) == len(ffcv) == 6
    # And the kernel, directly, on FFCV's own canvases (every batch, the short last one too).
    ffcv.set_epoch(0)
    for step, batch in enumerate(ffcv):
        images, mixed = kernel_on_own_canvas(ffcv, batch, 0, step)
        assert torch.equal(batch.images, images) and torch.equal(batch.mixed, mixed)
        assert not torch.equal(batch.mixed, batch.images)


def test_a_new_generation_is_used_from_the_next_epoch(pair):
    ffcv, ref = pair
    new = np.random.default_rng(0).random((len(ffcv.index), 8, 8)).astype(np.float32)
    ffcv.set_epoch(1)
    before = [b.mixed for b in ffcv]
    for loader in pair:
        loader.maps.publish(new)
    assert assert_same_epoch(ffcv, ref, 1) == 6        # refresh() at the epoch start picks it up
    assert ffcv.maps.generation == 1
    ffcv.set_epoch(1)
    after = [b.mixed for b in ffcv]
    assert not all(torch.equal(a, b) for a, b in zip(before, after))   # same params, other masks


def test_batches_held_by_the_caller_stay_intact(pair):
    """The op's output buffers are reused only once the caller has let go of a batch."""
    ffcv, ref = pair
    ffcv.set_epoch(5)
    ref.set_epoch(5)
    held, expect = list(ffcv), list(ref)
    for epoch in (6, 7):          # more batches through the loader while ``held`` lives
        ffcv.set_epoch(epoch)
        for _ in ffcv:
            pass
    for a, b in zip(held, expect, strict=True):
        for field in ("canvas", "images", "mixed", "labels", "indices"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_torch_mix_path_equals_the_ffcv_op(pair, index, beton):
    """What runs on a GPU (the torch kernel after the transfer), here on the CPU."""
    from backmix.pipeline.ffcv import FfcvLoader
    ffcv, _ = pair
    other = FfcvLoader(index, ffcv.config, ffcv.maps, ROWS, beton=beton, mix_in="torch")
    assert other.source.mix_in == "torch"
    assert assert_same_epoch(other, ffcv, 4) == 6


def test_mixed_only_equals_the_reference(index, beton):
    """clean=False: the op writes the mixed crop alone (the authors' recipe)."""
    from backmix.pipeline.ffcv import FfcvLoader
    config = LoaderConfig(batch_size=50, num_workers=2, seed=4, clean=False)
    maps = UniformMaps(len(index), 8)
    ffcv = FfcvLoader(index, config, maps, ROWS, beton=beton)
    ref = ReferenceLoader(index, config, maps, ROWS)
    assert assert_same_epoch(ffcv, ref, 3) == 6
    ffcv.set_epoch(3)
    assert all(b.images is None and b.mixed is not None for b in ffcv)


def test_evaluation_mode_equals_the_reference(index, beton):
    """Centre crop, no flip, no shuffle; BackMix still there when asked (and the short last batch)."""
    from backmix.pipeline.ffcv import FfcvLoader
    config = LoaderConfig(batch_size=64, num_workers=2, seed=5, train=False, shuffle=False)
    rows = ROWS[:130]
    ffcv = FfcvLoader(index, config, UniformMaps(len(index), 8), rows, beton=beton)
    ref = ReferenceLoader(index, config, UniformMaps(len(index), 8), rows)
    assert assert_same_epoch(ffcv, ref, 0) == 3


def test_two_shards_cover_every_index_once(index, beton):
    from backmix.pipeline.ffcv import FfcvLoader
    seen = []
    for rank in (0, 1):
        config = LoaderConfig(batch_size=40, num_workers=1, backmix=False, rank=rank, world_size=2)
        loader = FfcvLoader(index, config, indices=ROWS, beton=beton)
        loader.set_epoch(2)
        batches = list(loader)
        order = np.concatenate(loader.epoch_sampler.batches(2))
        assert torch.cat([b.indices for b in batches]).numpy().tolist() == ROWS[order].tolist()
        assert all(b.mixed is None for b in batches)
        assert all(torch.equal(b.labels, torch.from_numpy(index.labels[b.indices.numpy()])) for b in batches)
        seen += [b.indices for b in batches]
    assert sorted(torch.cat(seen).tolist()) == ROWS.tolist()


def test_write_beton_command_and_a_resized_beton(tiny_root, tmp_path, capsys):
    out = tmp_path / "tiny.beton"
    assert backmix_main(["data", "write-beton", "--data", str(tiny_root), "--out", str(out),
                         "--max-resolution", "40", "--mode", "jpg", "--jpeg-quality", "80", "--no-progress"]) == 0
    from ffcv.reader import Reader
    meta = Reader(str(out)).metadata
    tiny = ImageIndex.load(tiny_root)
    assert len(meta["f0"]) == 24 and (meta["f0"]["width"] == 40).all() and (meta["f0"]["height"] == 33).all()
    assert meta["f1"].tolist() == tiny.labels.tolist()     # label
    assert meta["f2"].tolist() == list(range(24))          # dataset index
    assert (meta["f3"] == -1).all()                        # canvas mode: none, images at their own size
    # The loader resizes these 40x33 images to its 32x32 canvas, then mixes them.
    from backmix.pipeline.ffcv import FfcvLoader
    loader = FfcvLoader(tiny, LoaderConfig(batch_size=10, canvas=32, crop=24, num_workers=1, seed=1), beton=out)
    loader.set_epoch(0)
    batches = list(loader)
    assert [len(b.indices) for b in batches] == [10, 10, 4]
    for step, batch in enumerate(batches):
        assert batch.canvas.shape == (len(batch.indices), 3, 32, 32) and batch.canvas.dtype == torch.uint8
        assert torch.equal(batch.labels, torch.from_numpy(tiny.labels[batch.indices.numpy()]))
        images, mixed = kernel_on_own_canvas(loader, batch, 0, step)
        assert torch.equal(batch.images, images) and torch.equal(batch.mixed, mixed)
    # Bad input: one line, exit 2, no file.
    capsys.readouterr()
    bad = tmp_path / "bad.beton"
    for extra in (["--jpeg-quality", "0"], ["--canvas", "32", "--max-resolution", "40"],
                  ["--jpeg-quality", "50"]):      # a quality without --mode jpg would write raw pixels
        assert backmix_main(["data", "write-beton", "--data", str(tiny_root), "--out", str(bad), *extra]) == 2
        assert extra[0] in capsys.readouterr().err
    assert not bad.exists()


def test_a_beton_that_does_not_fit_is_refused(index, tiny_root, tmp_path):
    from backmix.pipeline.ffcv import FfcvLoader
    with pytest.raises(BackMixError, match="does not exist"):
        FfcvLoader(index, LoaderConfig(), beton=tmp_path / "none.beton")
    tiny = write_beton(ImageIndex.load(tiny_root), tmp_path / "tiny.beton", canvas=40, progress=False).path
    with pytest.raises(BackMixError, match="not the 1257 rows"):
        FfcvLoader(index, LoaderConfig(), beton=tiny)


def test_an_image_that_does_not_decode_fails_the_write_cleanly(tiny_root, tmp_path):
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_root, folder, ignore=shutil.ignore_patterns(".backmix", "index.csv"))
    (folder / ImageIndex.load(tiny_root).paths[5]).write_bytes(b"not an image")
    index = ImageIndex.load(folder)   # indexed after breaking: a file changed since indexing fails otherwise
    with pytest.raises(BackMixError, match="1 image\\(s\\) do not decode"):
        write_beton(index, tmp_path / "t.beton", canvas=32, num_workers=1, progress=False)
    assert list(tmp_path.glob("*.beton*")) == [] and list(tmp_path.glob(".t.beton*")) == []


def test_missing_ffcv_says_how_to_install(monkeypatch, index, tmp_path):
    monkeypatch.setitem(sys.modules, "ffcv", None)
    with pytest.raises(BackMixError, match=r"pip install 'backmix\[ffcv\]'"):
        make_loader("ffcv", index, LoaderConfig())
    with pytest.raises(BackMixError, match="FFCV is not installed"):
        write_beton(index, tmp_path / "x.beton", canvas=40)
    assert backmix_main(["data", "write-beton", "--data", str(index.root), "--out", str(tmp_path / "x.beton")]) == 2


FFCV_RRC_ATOL = 3e-5   # normalised units (2e-3 grey levels): the torch op's float32 arithmetic, in numba with
# FFCV's fastmath (which may fuse and reorder a blend's multiply-adds)


@pytest.fixture(scope="module")
def tiny_center_beton(tiny_root, tmp_path_factory):
    """The tiny folder's 64 x 64 "center" canvases, raw: the reference loader's canvases exactly."""
    return write_beton(ImageIndex.load(tiny_root), tmp_path_factory.mktemp("beton") / "tiny-center.beton",
                       canvas=64, storage="raw", canvas_mode="center", progress=False).path


def test_rrc_equals_the_reference_and_the_torch_op(tiny_root, tiny_center_beton):
    """Canvases equal the reference's; clean and mixed resized crops equal ``BatchTransform`` (the torch op)
    on them to FFCV_RRC_ATOL, every batch, the short last one too; evaluation stays the centre crop."""
    from backmix.cam_cache import ArrayMaps
    from backmix.pipeline import BatchTransform
    from backmix.pipeline.ffcv import FfcvLoader
    tiny = ImageIndex.load(tiny_root)
    maps = ArrayMaps(np.random.default_rng(1).random((len(tiny), 8, 8), dtype=np.float32))
    config = LoaderConfig(batch_size=10, canvas=64, crop=56, augment="rrc", num_workers=1, seed=2)
    loader = FfcvLoader(tiny, config, maps, beton=tiny_center_beton)
    assert loader.source.mix_in == "ffcv"
    ref = ReferenceLoader(tiny, LoaderConfig(**{**vars(config), "num_workers": 0}), maps)
    transform = BatchTransform.for_config(maps, config)
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        ref.set_epoch(epoch)
        for step, (a, b) in enumerate(zip(loader, ref, strict=True)):
            assert torch.equal(a.canvas, b.canvas) and torch.equal(a.indices, b.indices)
            want = transform(a.canvas, a.indices.numpy(), epoch=epoch, step=step)   # (images, mixed)
            for got, exp in zip((a.images, a.mixed), want):
                assert (got - exp).abs().max() <= FFCV_RRC_ATOL
            assert not torch.equal(a.mixed, a.images)


def test_rrc_mixed_only_equals_the_torch_op(tiny_root, tiny_center_beton):
    """The mixed crops alone (the authors' recipe; the op reads the pasted box from a patch) to FFCV_RRC_ATOL."""
    from backmix.cam_cache import ArrayMaps
    from backmix.pipeline import BatchTransform
    from backmix.pipeline.ffcv import FfcvLoader
    tiny = ImageIndex.load(tiny_root)
    maps = ArrayMaps(np.random.default_rng(2).random((len(tiny), 8, 8), dtype=np.float32))
    config = LoaderConfig(batch_size=10, canvas=64, crop=40, augment="rrc", clean=False, num_workers=1, seed=4)
    transform = BatchTransform.for_config(maps, config)
    for step, a in enumerate(FfcvLoader(tiny, config, maps, beton=tiny_center_beton)):
        _, mixed = transform(a.canvas, a.indices.numpy(), epoch=0, step=step)
        assert a.images is None and (a.mixed - mixed).abs().max() <= FFCV_RRC_ATOL


def test_a_beton_of_the_other_canvas_mode_is_refused(tiny_root, tiny_center_beton, tmp_path):
    from backmix.pipeline.beton_location import beton_locations
    from backmix.pipeline.ffcv import FfcvLoader
    tiny = ImageIndex.load(tiny_root)
    with pytest.raises(BackMixError, match="holds center canvases, the loader makes stretch ones: write it with "
                                           "`backmix data write-beton --canvas 64 --canvas-mode stretch`"):
        FfcvLoader(tiny, LoaderConfig(canvas=64, crop=56, canvas_mode="stretch"), beton=tiny_center_beton)
    # Each mode has its own default file, so a loader never finds the other mode's.
    assert beton_locations(tiny, 64, canvas_mode="center") != beton_locations(tiny, 64, canvas_mode="stretch")


# --------------------------------------------------------------------------- writing a beton, on purpose

@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """ImageNet-sized JPEGs: re-encoding them at full size keeps a writer busy for seconds."""
    from backmix.bench.folders import make_bench_folder
    out = tmp_path_factory.mktemp("photos") / "photos"
    make_bench_folder(out, n=300)
    return out


def start_write(data, out, *extra, env=None, stderr=None):
    """A ``write-beton`` process; its stderr goes to ``stderr`` (default OUT.stderr)."""
    import os
    import subprocess
    err = open(stderr or str(out) + ".stderr", "w")
    proc = subprocess.Popen([sys.executable, "-m", "backmix", "data", "write-beton", "--data", str(data), "--out",
                             str(out), "--max-resolution", "500", "--workers", "1", *extra],
                            stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ, **(env or {})})
    return proc


def wait_until(condition, timeout=180.0):   # a busy shared machine starts Python slowly
    import time
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def processes_naming(path) -> list:
    """Live processes whose command line names ``path`` (a writer's forked children share it)."""
    import psutil
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if str(path) in " ".join(p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(p)
    return found


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_stops_a_beton_write_within_seconds_and_leaves_no_file(photos, tmp_path, sig):
    import signal
    import time
    out = tmp_path / "photos.beton"
    proc = start_write(photos, out)
    wait_until(lambda: list(tmp_path.glob(".photos.beton.tmp-*")))      # FFCV's writer has started
    # and written its first images (a progress line), not all of them: the signal lands mid-write
    wait_until(lambda: "writing photos.beton: " in (tmp_path / "photos.beton.stderr").read_text())
    assert "100%" not in (tmp_path / "photos.beton.stderr").read_text()
    sent = time.monotonic()
    proc.send_signal(getattr(signal, sig))
    rc = proc.wait(timeout=10)
    assert time.monotonic() - sent < 10
    assert rc != 0 and "interrupted" in (tmp_path / "photos.beton.stderr").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos.beton.stderr"]   # no beton, temp or lock
    wait_until(lambda: not processes_naming(out), timeout=5)                        # no writer left behind


def test_two_writers_never_write_at_once(photos, tmp_path):
    """A second writer waits on the lock, then finds the beton written by the first."""
    import fcntl
    out = tmp_path / "photos.beton"
    with open(tmp_path / ".photos.beton.lock", "a") as held:       # a writer that is still busy
        fcntl.flock(held, fcntl.LOCK_EX)
        logs = [tmp_path / f"{i}.stderr" for i in (0, 1)]
        procs = [start_write(photos, out, "--no-progress", stderr=log) for log in logs]
        for log in logs:
            wait_until(lambda: "waiting for it" in log.read_text())
        assert not list(tmp_path.glob(".photos.beton.tmp-*"))          # neither started writing
        fcntl.flock(held, fcntl.LOCK_UN)
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sorted(o.split()[0] for o in outs) == ["already", "wrote"], outs
    from ffcv.reader import Reader
    assert Reader(str(out)).num_samples == 300


def test_other_ranks_wait_for_rank_0(tiny_root, tmp_path):
    out = tmp_path / "tiny.beton"
    waiter = start_write(tiny_root, out, "--no-progress", env={"RANK": "1"})
    wait_until(lambda: "rank 1: waiting for rank 0" in open(str(out) + ".stderr").read())
    assert waiter.poll() is None and not out.exists()
    assert backmix_main(["data", "write-beton", "--data", str(tiny_root), "--out", str(out), "--no-progress"]) == 0
    assert waiter.communicate(timeout=120)[0].startswith("already written") and waiter.returncode == 0


def test_progress_is_a_line_every_few_percent_in_a_log(tiny_root, tmp_path):
    out = tmp_path / "tiny.beton"
    r = subprocess_write(tiny_root, out)
    lines = [x for x in r.stderr.split("\n") if x.startswith("writing tiny.beton")]
    assert "\r" not in r.stderr and lines[-1].startswith("writing tiny.beton: 100%") and "24/24" in lines[-1]
    assert len(lines) <= 100 // 5 + 1


def subprocess_write(data, out, *extra):
    import subprocess
    return subprocess.run([sys.executable, "-m", "backmix", "data", "write-beton", "--data", str(data), "--out",
                           str(out), *extra], capture_output=True, text=True, timeout=300)


def test_the_loader_never_writes_a_beton_and_says_the_command(tiny_root, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_root, folder)
    tiny = ImageIndex.load(folder)
    with pytest.raises(BackMixError, match=f"write it once with `backmix data write-beton --data {folder} "
                                           "--canvas 32 --canvas-mode center`") as e:
        make_loader("ffcv", tiny, LoaderConfig(canvas=32, crop=24))
    assert "\n" not in str(e.value)
    assert not (tmp_path / ".backmix-betons").exists() and not (tmp_path / "cache").exists()
    # The command it names writes where the loader looks: beside the image folder, never inside it ...
    assert backmix_main(["data", "write-beton", "--data", str(folder), "--canvas", "32", "--no-progress"]) == 0
    assert make_loader("ffcv", tiny, LoaderConfig(canvas=32, crop=24)).source.beton.parent == tmp_path / ".backmix-betons"
    assert sorted(p.name for p in folder.iterdir()) == ["cat", "dog", "fox", "index.arrow", "index.csv"]
    import torchvision
    assert torchvision.datasets.ImageFolder(str(folder)).classes == list(tiny.classes)   # stock ImageFolder loads it



def test_a_beton_of_files_changed_since_it_was_written_is_refused_with_the_command(tiny_root, tmp_path,
                                                                                    monkeypatch):
    import os
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_root, folder)
    assert backmix_main(["data", "write-beton", "--data", str(folder), "--canvas", "32", "--no-progress"]) == 0
    changed = folder / "dog" / "000009.png"
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))   # `touch`
    command = f"backmix data write-beton --data {folder} --canvas 32 --canvas-mode center"
    with pytest.raises(BackMixError, match=f"image {changed} is gone or changed after .*: delete that index file, "
                                           f"then rewrite the beton with `{command}`"):
        make_loader("ffcv", ImageIndex.load(folder), LoaderConfig(canvas=32, crop=24))
    # the command it names, after the index goes, makes the beton the loader then reads
    (folder / "index.csv").unlink()
    assert backmix_main(command.split()[1:] + ["--no-progress"]) == 0
    loader = make_loader("ffcv", ImageIndex.load(folder), LoaderConfig(canvas=32, crop=24, batch_size=24))
    assert len(loader) == 1


def test_a_read_only_data_folder_gets_its_beton_in_the_user_cache(tiny_root, tmp_path, monkeypatch, caplog):
    from backmix.pipeline import beton_location
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # the folder beside the image folder cannot be written (tried, not chmod: root ignores modes)
    monkeypatch.setattr(beton_location, "writable_folder", lambda folder: tiny_root.parent not in (folder, folder.parent))
    caplog.set_level("INFO", logger="backmix")
    assert backmix_main(["data", "write-beton", "--data", str(tiny_root), "--canvas", "32", "--no-progress"]) == 0
    assert "is read-only: writing the beton to " + str(tmp_path / "cache" / "backmix" / "betons") in caplog.text
    loader = make_loader("ffcv", ImageIndex.load(tiny_root), LoaderConfig(canvas=32, crop=24))
    assert loader.source.beton.parent == tmp_path / "cache" / "backmix" / "betons"


def test_train_names_the_missing_betons_of_train_and_test_up_front(small_root, tmp_path, capsys):
    """Before any work, in one line, with the one command that writes both; that command does."""
    from backmix.pipeline.beton_location import require_betons
    root = tmp_path / "data"
    shutil.copytree(small_root, root)
    train = ["train", "--data", str(root), "--out", str(tmp_path / "run"), "--backend", "ffcv", "--device", "cpu",
             "--no-progress"]
    capsys.readouterr()
    assert backmix_main(train) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"backmix: error: --backend ffcv reads betons written once, and "
                                               f"{root / 'train'} and {root / 'test'} have none at canvas 40 "
                                               f"(center, raw) (looked in {root / '.backmix-betons'} and ")
    assert err[0].endswith(f"write them with `backmix data write-beton --data {root} --canvas 40 --canvas-mode center`")
    assert not (tmp_path / "run").exists()
    assert backmix_main(["train", *train[1:], "--beton-mode", "jpg", "--jpeg-quality", "75"]) == 2
    assert "(center, jpg 75)" in capsys.readouterr().err
    assert backmix_main(["train", *train[1:5], "--beton-mode", "jpg"]) == 2
    assert "only --backend ffcv takes --beton-mode, not --backend reference" in capsys.readouterr().err
    assert backmix_main(["data", "write-beton", "--data", str(root), "--canvas", "40", "--no-progress"]) == 0
    indexes = [ImageIndex.load(root / "train"), ImageIndex.load(root / "test")]
    found = require_betons(root, indexes, 40, "center")
    assert [p.parent for p in found] == [root / ".backmix-betons"] * 2 and found[0] != found[1]
    assert sorted(p.name for p in root.iterdir()) == [".backmix-betons", "test", "train"]


@pytest.mark.parametrize("where", ["under a file", "a folder", "read-only"])
def test_a_bad_destination_fails_before_any_work(tiny_root, tmp_path, capsys, where):
    (tmp_path / "file").write_text("")
    out = {"under a file": tmp_path / "file" / "x.beton", "a folder": tmp_path,
           "read-only": "/proc/backmix-test/x.beton"}[where]
    assert backmix_main(["data", "write-beton", "--data", str(tmp_path / "no-such-folder"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"backmix: error: --out {out}")   # not "does not exist"


def test_on_error_skip_names_the_file_and_the_loader_leaves_it_out(folder_with_a_broken_file, tmp_path, capsys,
                                                                  caplog):
    out = tmp_path / "broken.beton"
    args = ["data", "write-beton", "--data", str(folder_with_a_broken_file), "--out", str(out), "--canvas", "32",
            "--no-progress"]
    assert backmix_main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dog/000009.png" in err and "--on-error skip" in err and not out.exists()
    assert backmix_main(args + ["--on-error", "skip"]) == 0
    assert "23 images, 1 skipped" in capsys.readouterr().out
    assert "skipped " + str(folder_with_a_broken_file / "dog" / "000009.png") in caplog.text
    index = ImageIndex.load(folder_with_a_broken_file)
    broken = index.paths.index("dog/000009.png")
    with pytest.raises(BackMixError, match="1 image\\(s\\) that did not decode, e.g. .*dog/000009.png"):
        make_loader("ffcv", index, LoaderConfig(canvas=32, crop=24), beton=out)
    loader = make_loader("ffcv", index, LoaderConfig(canvas=32, crop=24, batch_size=8, num_workers=1,
                                                     on_error="skip"), beton=out)
    assert loader.skipped == 1
    seen = torch.cat([b.indices for b in loader]).tolist()
    assert sorted(seen) == sorted(set(range(24)) - {broken})


def test_the_kernels_resize_tables_are_the_torch_ops_bit_for_bit():
    """The resized-crop kernel makes its own tables (``ffcv_kernels._table_maker``): they must be
    ``resize_tables``' exactly, over spans shorter and longer than the output, mirrored or not."""
    from backmix.pipeline.augment import resize_tables
    from backmix.pipeline.ffcv_kernels import _table_maker, span_scales

    spans = _table_maker()
    rng = np.random.default_rng(0)
    for size in (1, 7, 32, 224):
        corners = torch.from_numpy(rng.integers(0, 200, (40, 2)))
        sizes = torch.from_numpy(rng.integers(1, 300, (40, 2)))
        flips = torch.from_numpy(rng.random(40) < 0.5)
        want = [t.numpy() for t in resize_tables(corners, sizes, flips, size)]
        got = [np.full_like(t, -1) for t in want]
        scales = span_scales(sizes.numpy(), size)
        for i in range(40):
            spans(int(corners[i, 0]), int(sizes[i, 0]), scales[i, 0], size, False, got[0][i], got[1][i], got[2][i])
            spans(int(corners[i, 1]), int(sizes[i, 1]), scales[i, 1], size, bool(flips[i]), got[3][i], got[4][i], got[5][i])
        for g, w in zip(got, want):
            assert g.dtype == w.dtype
            np.testing.assert_array_equal(g, w)


def test_canvases_asked_for_part_way_come_with_the_batches_in_flight(index, beton):
    """Without keep_canvas no canvas leaves the loader; once the canvases are asked for (``keep_canvases``, as
    an in-loop rebuild does; here after FFCV has made the next batches ahead), every later batch carries its
    canvas, the reference's exactly."""
    from backmix.pipeline.ffcv import FfcvLoader
    config = LoaderConfig(batch_size=50, num_workers=2, seed=6, keep_canvas=False)
    maps = UniformMaps(len(index), 8)
    ffcv = FfcvLoader(index, config, maps, ROWS, beton=beton)
    ref = ReferenceLoader(index, LoaderConfig(**{**vars(config), "keep_canvas": True}), maps, ROWS)
    seen = []
    for step, (a, b) in enumerate(zip(ffcv, ref, strict=True)):
        if step < 2:
            assert a.canvas is None
        else:
            seen.append(a.canvas)
            assert torch.equal(a.canvas, b.canvas)
        assert torch.equal(a.mixed, b.mixed) and torch.equal(a.images, b.images)
        if step == 1:
            ffcv.keep_canvases()
    assert len(seen) == len(ref) - 2


def test_an_error_in_ffcvs_thread_is_raised_not_waited_for(index, beton, monkeypatch):
    """The op runs on FFCV's thread: an error there (here in the loader's inputs) ends the iteration with
    one clear error, where FFCV alone would leave the loop waiting for a batch that never comes."""
    from backmix.pipeline.ffcv import FfcvLoader
    config = LoaderConfig(batch_size=50, num_workers=2, seed=7)
    ffcv = FfcvLoader(index, config, UniformMaps(len(index), 8), ROWS, beton=beton)
    inputs = ffcv.inputs

    def broken(step, rows, sizes=None):
        if step == 3:
            raise RuntimeError("no maps for step 3")
        return inputs(step, rows, sizes)

    monkeypatch.setattr(ffcv, "inputs", broken)
    seen = []
    with pytest.raises(BackMixError, match="FFCV's loader thread failed at step 3 .*RuntimeError: no maps for step 3"):
        for batch in ffcv:
            seen.append(batch)
    assert len(seen) == 3
    monkeypatch.undo()   # and the loader still works: the next epoch is whole
    assert sum(len(b.indices) for b in ffcv) == len(ROWS)


def test_the_batch_pool_reuses_an_array_only_once_nothing_holds_it():
    """The op's crops live in ``BatchPool`` arrays handed out without a copy: a set still held (by a tensor
    or a view) is never handed out again; a set let go is; the pool keeps at most ``size`` sets."""
    from backmix.pipeline.batch_pool import BatchPool
    pool = BatchPool(4, [(2, 3), (2, 3)], np.float32, size=2)
    first = [torch.from_numpy(a) for a in pool.take(4)]
    second = pool.take(3)
    assert second[0].base is not first[0].numpy().base and len(second[0]) == 3
    third = pool.take(4)                   # both pooled sets held: a new array, not pooled
    assert len(pool.sets) == 2 and all(third[0].base is not s[0] for s in pool.sets)
    view = first[1][1:]                    # a view of the first set keeps it held
    del first
    assert pool.take(4)[0].base is not pool.sets[0][0]
    del view
    again = pool.take(2)
    assert again[0].base is pool.sets[0][0] and again[1].base is pool.sets[0][1]


def test_the_canvases_go_to_the_loaders_gpu(tiny_root, tiny_center_beton, monkeypatch):
    """FFCV's transfer is told the loader's device exactly (cuda:1, not the current GPU); made where no such
    GPU exists, the device choice passes the named device on, as it does where the GPU is."""
    import ffcv.transforms
    from backmix.pipeline import core
    cuda_1, seen = torch.device("cuda", 1), []

    class RecordedTransfer(ffcv.transforms.ToDevice):
        def __init__(self, device, non_blocking=True):
            seen.append(device)
            super().__init__(torch.device("cpu"), non_blocking)
    monkeypatch.setattr(core, "choose_device", lambda request: request)
    monkeypatch.setattr(ffcv.transforms, "ToDevice", RecordedTransfer)
    loader = make_loader("ffcv", ImageIndex.load(tiny_root), LoaderConfig(batch_size=4, canvas=64, crop=56,
                                                                           device="cuda:1"), beton=tiny_center_beton)
    assert loader.device == cuda_1 and loader.source.mix_in == "torch" and seen == [cuda_1]
    loader.close()
