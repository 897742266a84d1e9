"""One read of a canvas (``read_canvas``) and one normalisation for the loaders, the CAM pass and the
beton writer: a file missing or changed since indexing stops each with the same one-line error, and
the CAM pass feeds the model exactly what the loader feeds it."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from backmix.cam_cache import GenerationWriter, compute_cams, init_cache
from backmix.cli import main as backmix_main
from backmix.models import build_model, features_and_head
from backmix.osr_data import BackMixError, DecodeError, ImageIndex
from backmix.osr_data.normalize import IMAGENET_MEAN, IMAGENET_STD
from backmix.pipeline import LoaderConfig, make_loader

VICTIM = 3   # the dataset row damaged after indexing


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("cnn32", 3, width=0.25)


def damaged(tiny_root, tmp_path, how: str) -> tuple[ImageIndex, str]:
    """A fresh copy of the tiny folder, indexed, then row ``VICTIM`` removed or appended to; and the
    error the index itself gives for that file (what every reader must say)."""
    root = tmp_path / "train"
    shutil.copytree(tiny_root, root, ignore=shutil.ignore_patterns("index.csv", ".backmix*"))
    index = ImageIndex.load(root)
    path = index.abspath(VICTIM)
    if how == "missing":
        (root / index.paths[VICTIM]).unlink()
    else:
        with open(path, "ab") as f:
            f.write(b"changed")
    with pytest.raises(BackMixError) as said:
        index.checked_path(VICTIM)
    return index, str(said.value)


def reference_loader(index, model, tmp_path):
    list(make_loader("reference", index, LoaderConfig(batch_size=8, num_workers=0, on_error="skip",
                                                      shuffle=False, device="cpu")))


def cam_pass(index, model, tmp_path):
    rows = np.arange(len(index))
    compute_cams(model, index, rows, index.labels[rows], canvas=40, grid=8, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD, batch_size=8, num_workers=0, device="cpu", progress=False)


def beton_writer(index, model, tmp_path):
    pytest.importorskip("ffcv", reason="the beton writer needs FFCV")
    from backmix.pipeline.beton import write_beton
    try:
        write_beton(index, tmp_path / "out" / "x.beton", canvas=40, num_workers=1, progress=False,
                    on_error="skip")
    finally:
        assert not list((tmp_path / "out").glob("*"))   # no beton, temporary or half-written file left


@pytest.mark.parametrize("how", ["missing", "changed"])
@pytest.mark.parametrize("reader", [reference_loader, cam_pass, beton_writer])
def test_a_missing_or_changed_file_stops_every_reader_with_the_indexs_error(tiny_root, tmp_path, model, how,
                                                                            reader):
    index, expected = damaged(tiny_root, tmp_path, how)
    with pytest.raises(BackMixError) as err:
        reader(index, model, tmp_path)
    assert str(err.value) == expected and not isinstance(err.value, DecodeError)


def test_write_beton_of_a_changed_file_says_one_line(tiny_root, tmp_path, capfd):
    """The worker that finds the file stops the write; the user sees its error, not the worker's traceback."""
    pytest.importorskip("ffcv", reason="the beton writer needs FFCV")
    index, expected = damaged(tiny_root, tmp_path, "changed")
    out = tmp_path / "out" / "x.beton"
    capfd.readouterr()
    assert backmix_main(["--quiet", "data", "write-beton", "--data", str(index.root), "--out", str(out),
                         "--canvas", "32", "--workers", "2", "--on-error", "skip", "--no-progress"]) == 2
    assert capfd.readouterr().err == f"backmix: error: {expected}\n"
    assert not list(out.parent.glob("*"))


def test_the_cam_pass_raises_on_a_file_that_does_not_decode(folder_with_a_broken_file, model):
    index = ImageIndex.load(folder_with_a_broken_file)
    with pytest.raises(DecodeError, match=r"broken/dog/000009.png does not decode"):
        cam_pass(index, model, None)


def test_the_cam_pass_feeds_the_model_the_loaders_input(tiny_root, tmp_path, model):
    """The separate pass and the in-loop CAMs (``add_canvases``) give the model, bit for bit, the
    evaluation loader's normalised canvases (crop = canvas: the whole canvas, normalised)."""
    index = ImageIndex.load(tiny_root)
    seen = []
    handle = features_and_head(model)[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    try:
        cam_pass(index, model, tmp_path)
        passed, seen[:] = torch.cat(seen), []
        loader = make_loader("reference", index, LoaderConfig(batch_size=8, canvas=40, crop=40, train=False,
                                                              shuffle=False, backmix=False, num_workers=0,
                                                              device="cpu"))
        batches = list(loader)
        init_cache(tmp_path / "cache", index)
        writer = GenerationWriter(tmp_path / "cache", model, index, canvas=40,
                                  mean=IMAGENET_MEAN, std=IMAGENET_STD)
        for batch in batches:
            writer.add_canvases(batch.canvas, batch.indices)
        in_loop = torch.cat(seen)
    finally:
        handle.remove()
    want = torch.cat([b.images for b in batches])
    assert torch.cat([b.indices for b in batches]).tolist() == list(range(len(index)))
    assert want.dtype == torch.float32 and want.shape == (len(index), 3, 40, 40)
    assert torch.equal(passed, want) and torch.equal(in_loop, want)
