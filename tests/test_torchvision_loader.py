"""The torchvision backend (workers read JPEG bytes; the loader's device decodes, resizes and mixes)
held to the reference loader on the CPU.

The bound, measured: on the CPU ``decode_jpeg`` is the libjpeg-turbo decoder the reference loader's
``decode_image`` calls (and PIL's, here): over the 256 bench photos (500 x 375 JPEG q90) the largest
difference of decoded pixels, and of 224 canvases, between any two of them is 0; the bundled data
sets are PNGs, which both backends decode with the same worker code. So the CPU stream is compared
bit for bit. nvjpeg on a GPU is held to a stated bound in tests/test_cuda.py.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from backmix.cam_cache import ArrayMaps
from backmix.osr_data import BackMixError, ImageIndex
from backmix.bench.folders import make_bench_folder
from backmix.osr_data.decode import DecodeError
from backmix.pipeline import LoaderConfig, make_loader

import backmix.pipeline.device_decode as device_decode

from helpers import state_after


@pytest.fixture(scope="module")
def photo_root(tmp_path_factory):
    """16 bench photos (JPEG q90, 500 x 375 or 375 x 500), a PNG and a grey JPEG: what the device
    decodes and what the workers decode, in one folder."""
    root = tmp_path_factory.mktemp("photos") / "train"
    make_bench_folder(root, n=16)
    first = sorted(root.glob("*/*.jpg"))[0]
    Image.open(first).crop((0, 0, 300, 200)).save(first.parent / "extra-png.png")
    Image.open(first).convert("L").save(first.parent / "extra-grey.jpg", quality=90)
    (root / "index.csv").unlink()
    ImageIndex.scan(root).write()
    return root


def config(**kw) -> LoaderConfig:
    base = dict(batch_size=6, canvas=48, crop=40, num_workers=0, seed=5, device="cpu")
    return LoaderConfig(**{**base, **kw})


def maps_for(index):
    return ArrayMaps(np.random.default_rng(2).random((len(index), 8, 8), dtype=np.float32))


def stream(backend, index, cfg, epochs=(0, 1), **kw):
    loader = make_loader(backend, index, cfg, maps_for(index), **kw)
    out = []
    for epoch in epochs:
        loader.set_epoch(epoch)
        out += [tuple(batch) for batch in loader]
    return out, loader


def assert_same_stream(got, want):
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        for name, x, y in zip(("canvas", "images", "mixed", "labels", "dataset_labels", "indices"), g, w):
            assert (x is None and y is None) or torch.equal(x, y), name


@pytest.mark.parametrize("kw", [dict(), dict(canvas_mode="stretch", augment="rrc", num_workers=1),
                                dict(clean=False), dict(auto_augment="trivialaugment"),
                                dict(train=False, shuffle=False, backmix=False),
                                dict(canvas_mode="stretch", augment="rrc", crop_from="image"),
                                dict(canvas_mode="stretch", augment="rrc", crop_from="image", num_workers=1,
                                     backmix=False, views=2)],
                         ids=["center-crop", "stretch-rrc-worker", "mixed-only", "auto-augment", "evaluation",
                              "crop-from-image", "crop-from-image-two-views-worker"])
def test_its_stream_is_the_reference_loaders_bit_for_bit(photo_root, kw):
    index = ImageIndex.load(photo_root)
    cfg = config(**kw)
    assert_same_stream(stream("torchvision", index, cfg)[0], stream("reference", index, cfg)[0])


def test_on_the_bundled_digits_through_the_public_api(digits_root):
    import backmix
    data = backmix.open_set_data(digits_root, split=0)
    kw = dict(batch_size=128, num_workers=0, device="cpu")

    def batches(backend):
        return [tuple(b) for b in backmix.loader(data, backend=backend, **kw)]
    assert_same_stream(batches("torchvision"), batches("reference"))


@pytest.mark.parametrize("cut", [1, 2])
def test_a_restored_loader_continues_with_the_batch_it_would_have_made(photo_root, cut):
    index = ImageIndex.load(photo_root)
    want, _ = stream("torchvision", index, config(), epochs=(1,))
    state = state_after(make_loader("torchvision", index, config(), maps_for(index)), 1, cut)
    assert state == {"epoch": 1, "step": cut, "skipped": 0}
    second = make_loader("torchvision", index, config(), maps_for(index))
    second.load_state_dict(state)
    second.set_epoch(1)
    assert_same_stream([tuple(b) for b in second], want[cut:])


def test_two_shards_cover_every_index_once_as_the_reference_shards_do(photo_root):
    index = ImageIndex.load(photo_root)
    seen = []
    for rank in (0, 1):
        cfg = config(rank=rank, world_size=2)
        got, _ = stream("torchvision", index, cfg, epochs=(3,))
        assert_same_stream(got, stream("reference", index, cfg, epochs=(3,))[0])
        seen += torch.cat([b[5] for b in got]).tolist()
    assert sorted(seen) == list(range(len(index)))


def test_the_batch_is_decoded_from_file_bytes_and_no_pixel_reaches_the_host(photo_root, monkeypatch,
                                                                             pixels_stay_on_the_device):
    """The device decode is given the files' bytes (host, 1-D) and every JPEG of the batch; from there
    on no pixel tensor is read to the host (on the CPU the guard sees the same calls a GPU run makes)."""
    index = ImageIndex.load(photo_root)
    calls = []
    real = device_decode.decode_jpeg

    def spy(blobs, **kw):
        calls.append((list(blobs), kw["device"]))
        return real(blobs, **kw)
    monkeypatch.setattr(device_decode, "decode_jpeg", spy)
    loader = make_loader("torchvision", index, config(augment="rrc"), maps_for(index))
    with pixels_stay_on_the_device:
        batches = list(loader)
        x, _ = batches[0].inputs()          # the model input
        with pytest.raises(AssertionError, match="pixels read to the host"):
            batches[0].canvas.cpu()         # the guard does fail on a host read
        with pytest.raises(AssertionError, match="pixels read to the host"):
            x.numpy()
    jpeg_rows = [i for i in range(len(index)) if index.abspath(i).endswith(".jpg")]
    assert len(calls) == len(batches) and all(device == loader.device for _, device in calls)
    decoded = [blob for blobs, _ in calls for blob in blobs]
    assert len(decoded) == len(jpeg_rows) == len(index) - 1
    served = torch.cat([b.indices for b in batches]).tolist()
    files = [np.fromfile(index.abspath(i), dtype=np.uint8) for i in served if i in jpeg_rows]
    assert all(blob.dim() == 1 and blob.device.type == "cpu" and np.array_equal(blob.numpy(), f)
               for blob, f in zip(decoded, files))


@pytest.fixture()
def photos_with_a_broken_jpeg(photo_root, tmp_path):
    """The photo folder with one JPEG cut short to its first 400 bytes (a header, no image), indexed as it is."""
    root = tmp_path / "broken"
    shutil.copytree(photo_root, root, ignore=shutil.ignore_patterns("index.csv"))
    victim = sorted(root.glob("*/*.jpg"))[3]
    victim.write_bytes(victim.read_bytes()[:400])
    ImageIndex.scan(root).write()
    return root, str(victim)


@pytest.mark.parametrize("kw", [dict(), dict(canvas_mode="stretch", augment="rrc", crop_from="image")],
                         ids=["canvas", "crop-from-image"])
def test_a_broken_jpeg_is_named_or_skipped_as_the_reference_loader_does(photos_with_a_broken_jpeg, kw):
    root, victim = photos_with_a_broken_jpeg
    index = ImageIndex.load(root)
    with pytest.raises(DecodeError, match=f"image {victim} does not decode"):
        stream("torchvision", index, config(**kw))
    cfg = config(on_error="skip", **kw)
    got, loader = stream("torchvision", index, cfg)
    want, reference = stream("reference", index, cfg)
    assert_same_stream(got, want)
    assert loader.skipped == reference.skipped == 2        # once an epoch
    assert sum(len(b[5]) for b in got) == 2 * (len(index) - 1)


def test_a_file_changed_after_indexing_is_refused(photo_root, tmp_path):
    root = tmp_path / "changed"
    shutil.copytree(photo_root, root)
    victim = sorted(root.glob("*/*.jpg"))[0]
    victim.write_bytes(victim.read_bytes() + b"\0")
    index = ImageIndex.load(root)
    with pytest.raises(BackMixError, match="changed after"):
        stream("torchvision", index, config(on_error="skip"))
