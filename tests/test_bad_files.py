"""A bad file behaves the same in every backend, the CAM pass and the beton writer (issue 21).

A file deleted or changed since the index was written means the data set no longer matches its index,
caches and betons: ``BackMixError`` naming the file, whatever ``on_error`` says. A file that does not
decode (indexed as it is): ``DecodeError`` naming the file under "raise"; left out and counted under
"skip" (the CAM pass, which needs every row's map, raises it either way). Each time the error is the
reference's: the same type and the same one-line message (``read_canvas``'s).
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from backmix.osr_data import BackMixError, DecodeError, ImageIndex
from backmix.osr_data.decode import read_canvas
from backmix.pipeline import LoaderConfig, make_loader

BAD = "dog/000009.png"   # row 9 of the tiny folder
TARGETS = ("reference", "torchvision", "dali", "ffcv", "ray", "cam pass", "beton writer")
NEEDS = {"dali": "nvidia.dali", "ffcv": "ffcv", "ray": "ray", "beton writer": "ffcv"}


@pytest.fixture(scope="module", autouse=True)
def no_ray_left_behind():
    """The ray target starts a local Ray; later test modules start their own cluster."""
    yield
    ray = __import__("sys").modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.fixture()
def bad_folder(tiny_root, tmp_path, request):
    """(index, path of the bad file) of a copy of the tiny folder in which BAD is ``request.param``:
    "missing" or "changed" (rewritten, another size) after indexing, or "undecodable" when indexed."""
    root = tmp_path / "data" / "train"
    shutil.copytree(tiny_root, root, ignore=shutil.ignore_patterns("index.csv", ".backmix*"))
    if request.param == "undecodable":
        (root / BAD).write_bytes(b"this is not a png")
    index = ImageIndex.scan(root)
    index.write()
    if request.param == "missing":
        (root / BAD).unlink()
    elif request.param == "changed":
        Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(root / BAD)
    return index, str(root / BAD)


def run(target: str, index: ImageIndex, on_error: str, tmp_path) -> tuple[list[int], int]:
    """(rows served, files skipped) of one pass of ``target`` over ``index``; raises what it raises."""
    cfg = LoaderConfig(batch_size=5, canvas=40, crop=32, num_workers=1, device="cpu", on_error=on_error,
                       shuffle=False)
    if target == "cam pass":
        from backmix.cam_cache import compute_cams
        from backmix.models import build_model
        rows = np.arange(len(index))
        compute_cams(build_model("cnn32", 3, width=0.25), index, rows, index.labels, canvas=40, grid=8,
                     mean=cfg.mean, std=cfg.std, batch_size=5, num_workers=0, progress=False)
        return rows.tolist(), 0
    options = {}
    if target in ("ffcv", "beton writer"):
        from backmix.pipeline.beton import write_beton
        written = write_beton(index, tmp_path / "bad.beton", canvas=40, num_workers=1, progress=False,
                              on_error=on_error)
        if target == "beton writer":
            skipped = set(written.skipped)
            return [i for i in range(len(index)) if index.abspath(i) not in skipped], len(skipped)
        options["beton"] = written.path
    loader = make_loader(target, index, cfg, **options)
    try:
        rows = torch.cat([b.indices for b in loader]).tolist()
    finally:
        loader.close()
    return rows, loader.skipped


@pytest.mark.parametrize("on_error", ["raise", "skip"])
@pytest.mark.parametrize("bad_folder", ["missing", "changed", "undecodable"], indirect=True)
@pytest.mark.parametrize("target", TARGETS)
def test_a_bad_file_behaves_as_in_the_reference(target, bad_folder, on_error, tmp_path):
    if target in NEEDS:
        pytest.importorskip(NEEDS[target])
    index, path = bad_folder
    row = index.paths.index(BAD)
    expected = read_canvas(index, row, 40, on_error="return")   # the reference's error for the file
    assert isinstance(expected, BackMixError) and path in str(expected)
    undecodable = isinstance(expected, DecodeError)
    if undecodable and on_error == "skip" and target != "cam pass":
        rows, skipped = run(target, index, on_error, tmp_path)
        assert sorted(rows) == [i for i in range(len(index)) if i != row] and skipped == 1
        return
    with pytest.raises(BackMixError) as e:
        run(target, index, on_error, tmp_path)
    assert type(e.value) is type(expected)   # DecodeError, or the plain BackMixError of a missing/changed file
    assert str(expected) in str(e.value) and "\n" not in str(e.value)


def test_a_folder_named_like_the_index_file_is_one_line(tmp_path):
    from backmix.osr_data.index import INDEX_NAME, ImageIndex
    from backmix.osr_data.split_folder import write_split
    rng = np.random.default_rng(0)
    write_split(tmp_path / "train", rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), np.arange(4) % 2,
                ("a", "b"))
    (tmp_path / "train" / INDEX_NAME).unlink()
    (tmp_path / "train" / INDEX_NAME).mkdir()
    with pytest.raises(BackMixError, match="is not a file"):
        ImageIndex.load(tmp_path / "train")
