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
from backmix.pipeline import LoaderConfig, ReferenceLoader, backmix, crop_flip, fill_value, make_loader, normalize
from backmix.pipeline.beton import write_beton

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
def beton(index, tmp_path_factory):
    return write_beton(index, tmp_path_factory.mktemp("beton") / "digits-raw.beton", canvas=40, mode="raw",
                       progress=False).path


@pytest.fixture(scope="module")
def pair(index, beton):
    """(FFCV loader, reference loader) with the same config, each with its own swappable maps."""
    from backmix.pipeline.ffcv import FfcvLoader
    config = LoaderConfig(batch_size=50, num_workers=2, seed=3)
    ffcv = FfcvLoader(index, config, SwappingMaps(len(index)), ROWS, beton=beton)
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
    ffcv, ref = pair
    assert ffcv.mix_in == "ffcv" and ffcv.backend == "ffcv"
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
    assert other.mix_in == "torch"
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
                         "--max-resolution", "40", "--jpeg-quality", "80", "--no-progress"]) == 0
    from ffcv.reader import Reader
    meta = Reader(str(out)).metadata
    tiny = ImageIndex.load(tiny_root)
    assert len(meta["f0"]) == 24 and (meta["f0"]["width"] == 40).all() and (meta["f0"]["height"] == 33).all()
    assert meta["f1"].tolist() == tiny.labels.tolist()     # label
    assert meta["f2"].tolist() == list(range(24))          # dataset index
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
    for extra in (["--jpeg-quality", "0"], ["--canvas", "32", "--max-resolution", "40"]):
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
    index = ImageIndex.load(folder)
    (folder / index.paths[5]).write_bytes(b"not an image")
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
