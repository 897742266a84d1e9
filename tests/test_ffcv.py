"""The FFCV loader: the reference loader's stream, exactly, from a raw-mode .beton.

FFCV compiles its pipeline with numba when a loader is built (seconds), so the
tests share one BackMix loader and build only the few others they need.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from cam_cache.maps import UniformMaps
from osr_data import BackMixError, ImageIndex
from pipeline import LoaderConfig, ReferenceLoader, backmix, crop_flip, fill_value, make_loader, normalize
from pipeline.beton import write_beton

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
    return write_beton(index, tmp_path_factory.mktemp("beton") / "digits-raw.beton", canvas=40, mode="raw")


@pytest.fixture(scope="module")
def pair(index, beton):
    """(FFCV loader, reference loader) with the same config, each with its own swappable maps."""
    from pipeline.ffcv import FfcvLoader
    config = LoaderConfig(batch_size=50, num_workers=1, seed=3)
    ffcv = FfcvLoader(index, config, SwappingMaps(len(index)), ROWS, beton=beton)
    ref = ReferenceLoader(index, config, SwappingMaps(len(index)), ROWS)
    return ffcv, ref


def assert_same_epoch(ffcv, ref, epoch: int) -> int:
    ffcv.set_epoch(epoch)
    ref.set_epoch(epoch)
    n = 0
    for a, b in zip(ffcv, ref, strict=True):
        for field in ("canvas", "images", "mixed", "labels", "indices"):
            assert torch.equal(getattr(a, field), getattr(b, field)), (epoch, n, field)
        n += 1
    return n


def test_ffcv_stream_equals_the_reference_and_the_kernel(pair):
    ffcv, ref = pair
    assert assert_same_epoch(ffcv, ref, 0) == len(ref) == 6
    # And the kernel, directly, on FFCV's own canvases.
    ffcv.set_epoch(0)
    batch = next(iter(ffcv))
    cfg = ffcv.config
    p = cfg.sampler().draw(len(batch.indices), 0, 0).torch()
    maps = torch.from_numpy(ffcv.maps.gather(batch.indices.numpy()))
    mixed = backmix(batch.canvas, maps, p["partners"], p["tie_break"], p["boxes"], top_k_ratio=cfg.top_k_ratio,
                    box_hw=cfg.sampler().box_hw, fill=fill_value(cfg.mean))
    expect = normalize(crop_flip(mixed, p["crops"], p["flips"], cfg.crop), torch.tensor(cfg.mean), torch.tensor(cfg.std))
    assert torch.equal(batch.mixed, expect)
    assert not torch.equal(batch.mixed, batch.images)


def test_a_new_generation_is_used_from_the_next_epoch(pair):
    ffcv, ref = pair
    rng = np.random.default_rng(0)
    new = rng.random((len(ffcv.index), 8, 8)).astype(np.float32)
    ffcv.set_epoch(1)
    before = next(iter(ffcv)).mixed
    for loader in pair:
        loader.maps.publish(new)
    assert assert_same_epoch(ffcv, ref, 1) == 6        # refresh() at the epoch start picks it up
    assert ffcv.maps.generation == 1
    ffcv.set_epoch(1)
    assert not torch.equal(next(iter(ffcv)).mixed, before)   # same params, other masks


def test_two_shards_cover_every_index_once(index, beton):
    from pipeline.ffcv import FfcvLoader
    seen = []
    for rank in (0, 1):
        config = LoaderConfig(batch_size=40, num_workers=1, backmix=False, rank=rank, world_size=2)
        loader = FfcvLoader(index, config, indices=ROWS, beton=beton)
        loader.set_epoch(2)
        seen += [b.indices for b in loader]
        assert all(torch.equal(b.labels, torch.from_numpy(index.labels[b.indices.numpy()])) for b in loader)
    seen = torch.cat(seen).numpy()
    assert sorted(seen.tolist()) == ROWS.tolist()


def test_write_beton_command(tiny_root, tmp_path):
    out = tmp_path / "tiny.beton"
    r = subprocess.run([sys.executable, "-m", "backmix", "data", "write-beton", "--data", str(tiny_root),
                        "--out", str(out), "--canvas", "32", "--jpeg-quality", "80"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    from ffcv.reader import Reader
    reader = Reader(str(out))
    assert reader.num_samples == 24
    meta = reader.metadata
    assert (meta["f0"]["width"] == 32).all() and (meta["f0"]["height"] == 32).all()
    assert meta["f1"].tolist() == ImageIndex.load(tiny_root).labels.tolist()     # label
    assert meta["f2"].tolist() == list(range(24))                                 # dataset index
    r = subprocess.run([sys.executable, "-m", "backmix", "data", "write-beton", "--data", str(tiny_root),
                        "--out", str(out), "--jpeg-quality", "0"], capture_output=True, text=True)
    assert r.returncode == 2 and "--jpeg-quality" in r.stderr


def test_a_beton_of_another_canvas_is_refused(index, beton):
    from pipeline.ffcv import FfcvLoader
    with pytest.raises(BackMixError, match="not all 48x48"):
        FfcvLoader(index, LoaderConfig(canvas=48, crop=40), beton=beton)


def test_missing_ffcv_says_how_to_install(monkeypatch, index):
    monkeypatch.setitem(sys.modules, "ffcv", None)
    with pytest.raises(BackMixError, match=r"pip install 'backmix\[ffcv\]'"):
        make_loader("ffcv", index, LoaderConfig())
