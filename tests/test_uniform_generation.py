"""Generation 0 without a file (``start_cache``): uniform reads, the same generation 1 as a written generation 0."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from backmix.cam_cache import ForegroundCache, build_generation, cache_info, init_cache, start_cache
from backmix.models import build_model
from backmix.osr_data import BackMixError, ImageIndex

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture(scope="module")
def index(digits_root) -> ImageIndex:
    return ImageIndex.load(digits_root / "train")


def test_a_started_cache_holds_only_its_pointer_and_reads_uniform_maps(tmp_path, index, tiny_root):
    cache = start_cache(tmp_path / "c", index, grid=4, keep=2)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["CURRENT"]
    assert json.loads((tmp_path / "c" / "CURRENT").read_text())["generation"] == 0
    rows = np.array([0, 5, len(index) - 1, 5])
    assert cache.generation == 0 and len(cache) == len(index) and cache.grid == 4
    assert np.array_equal(cache.gather(rows), np.full((4, 4, 4), 0.5, np.float32))
    assert cache.gather(rows).dtype == np.float32 and not cache.maps.flags.writeable
    assert np.array_equal(cache.labels, index.labels) and np.array_equal(cache.rows, np.arange(len(index)))
    again = pickle.loads(pickle.dumps(cache))               # a loader worker's copy
    assert np.array_equal(again.gather(rows), cache.gather(rows)) and not again.refresh()
    info = cache_info(tmp_path / "c")
    assert (info["generation"], info["rows"], info["grid"], info["keep"], info["generations_on_disk"]) == \
        (0, len(index), 4, 2, [])
    # Checked like a written generation 0: another data set, grid or canvas mode is refused.
    with pytest.raises(BackMixError, match="another data set"):
        start_cache(tmp_path / "c", ImageIndex.load(tiny_root), grid=4)
    with pytest.raises(BackMixError, match="expected 8x8"):
        ForegroundCache(tmp_path / "c", grid=8)
    with pytest.raises(BackMixError, match="expected 'stretch'"):
        start_cache(tmp_path / "c", index, grid=4, canvas_mode="stretch")
    assert start_cache(tmp_path / "c", index, grid=4).generation == 0      # reopened, not rewritten


def test_the_first_rebuild_from_no_file_writes_the_same_generation_one_as_from_a_written_zero(tmp_path, index):
    torch.manual_seed(0)
    model = build_model("cnn32", 10, width=0.25)
    rows = np.arange(0, len(index), 9)
    start_cache(tmp_path / "implicit", index)
    init_cache(tmp_path / "written", index)
    for name in ("implicit", "written"):
        assert build_generation(tmp_path / name, model, index, canvas=40, mean=MEAN, std=STD, rows=rows,
                                num_workers=0, progress=False) == 1
    one, two = (tmp_path / n / "gen-000001.arrow" for n in ("implicit", "written"))
    assert one.read_bytes() == two.read_bytes()          # labels, maps (momentum from 0.5) and metadata
    maps = ForegroundCache(tmp_path / "implicit", index=index).maps
    others = np.setdiff1d(np.arange(len(index)), rows)
    assert np.all(maps[others] == 0.5) and not np.all(maps[rows] == 0.5)
    assert "uniform" not in json.loads((tmp_path / "implicit" / "CURRENT").read_text())


def test_a_pointer_naming_an_incomplete_uniform_generation_is_one_line(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "CURRENT").write_text(json.dumps({"generation": 0, "keep": 3, "uniform": {"grid": 8}}))
    with pytest.raises(BackMixError, match="names a uniform generation 0 without"):
        ForegroundCache(tmp_path / "c")
