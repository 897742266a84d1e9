"""Every torch path on a GPU held to its CPU result.

Collected everywhere; skipped with the reason where there is no CUDA (the CPU tests cover the logic).
Needs only torch, torchvision, pyarrow, scikit-learn, scikit-image, tqdm, matplotlib, psutil and pytest
(no DALI, no FFCV, nothing downloaded):

    python3 -m pip install --no-deps --no-build-isolation -e . && python3 -m pytest -q tests/test_cuda.py
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from backmix.cam_cache import compute_cams
from backmix.models import Classifier32
from backmix.osr_data import ImageIndex
from backmix.pipeline import BackMix, BackMixSampler, LoaderConfig, make_loader
from backmix.pipeline.batch import to_device

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


@pytest.fixture()
def exact_float32():
    """TF32 convolutions and matmuls round inputs to 10 bits: a CPU comparison to 1e-5 needs them off."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_the_mix_kernel_on_cuda_equals_the_cpu():
    b, canvas, g = 16, 40, 8
    sampler = BackMixSampler(canvas=canvas, crop=32, grid=g, seed=3)
    canvases = torch.randint(0, 256, (b, 3, canvas, canvas), dtype=torch.uint8,
                             generator=torch.Generator().manual_seed(0))
    maps = torch.rand(b, g, g, generator=torch.Generator().manual_seed(1))
    mix = BackMix()
    p = sampler.draw(b, epoch=2, step=5).torch()
    on_cpu = mix(canvases, maps, p)
    on_gpu = mix(canvases.cuda(), maps.cuda(), {k: v.cuda() for k, v in p.items()})
    assert torch.equal(on_gpu.cpu(), on_cpu)        # integer arithmetic only: bit for bit


def test_the_reference_loader_on_cuda_equals_the_cpu(digits_root):
    index = ImageIndex.load(digits_root / "train")
    rows = np.arange(0, len(index), 5)

    def batches(device):
        loader = make_loader("reference", index, LoaderConfig(batch_size=32, device=device, num_workers=0),
                             indices=rows)
        out = []
        for epoch in range(2):
            loader.set_epoch(epoch)
            out += [[None if t is None else t.cpu() for t in (b.canvas, b.images, b.mixed, b.labels)]
                    for b in loader]
        return out

    cpu, gpu = batches("cpu"), batches("cuda")
    assert len(cpu) == len(gpu) > 2
    for c, g in zip(cpu, gpu):
        assert torch.equal(c[0], g[0]) and torch.equal(c[3], g[3])
        # The mix, crop and flip are exact; normalising is one float multiply-add per pixel.
        for name, x, y in (("images", c[1], g[1]), ("mixed", c[2], g[2])):
            torch.testing.assert_close(y, x, rtol=0, atol=1e-6, msg=name)


def test_cam_precompute_on_cuda_equals_the_cpu(digits_root, exact_float32):
    index = ImageIndex.load(digits_root / "train")
    torch.manual_seed(0)
    model = Classifier32(10, width=0.25).eval()
    rows = np.arange(0, 200)
    kw = dict(canvas=40, grid=8, mean=(0.5,) * 3, std=(0.25,) * 3, num_workers=0, progress=False)
    cpu = compute_cams(model, index, rows, index.labels[rows], device="cpu", **kw)
    gpu = compute_cams(model, index, rows, index.labels[rows], device="cuda", **kw)
    assert cpu.shape == gpu.shape == (200, 8, 8)
    np.testing.assert_allclose(gpu, cpu, rtol=0, atol=1e-4)   # cuDNN sums in another order


def test_one_trainer_epoch_with_amp_and_channels_last(digits_root, tmp_path):
    from backmix.trainers import TrainConfig, main
    cfg = TrainConfig(data=str(digits_root), out=str(tmp_path / "run"), epochs=1, device="cuda", amp="auto",
                      channels_last=True, workers=0, progress=False, regen_every=1)
    metrics = main(cfg)
    line = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1]
    import json
    record = json.loads(line)
    assert math.isfinite(record["loss"]) and record["images"] > 0
    for key in ("accuracy", "auroc_msp", "auroc_mls", "oscr_msp"):
        assert 0.0 <= metrics[key] <= 1.0


def test_the_asynchronous_transfer_is_pinned_and_exact():
    host = torch.arange(1 << 20, dtype=torch.int64)
    out = to_device(host, "cuda")
    torch.cuda.current_stream().synchronize()
    assert out.device.type == "cuda" and torch.equal(out.cpu(), host)
    pinned = host.pin_memory()
    assert torch.equal(to_device(pinned, "cuda").cpu(), host)


# --- the torchvision backend: JPEG bytes decoded by nvjpeg, canvases made and mixed on the GPU ---------------

# nvjpeg vs libjpeg-turbo (the CPU decode, which is the reference loader's bit for bit): their IDCT and
# chroma upsampling differ, and the GPU resize rounds its float result where the CPU one works in
# integers. Set before any GPU run (none was lent while this was written), from that: a few levels on
# average, more at sharp colour edges of 4:2:0 JPEGs. scripts/gpu-check.sh records the measured figures
# (decode-gpu.json); tighten these to them.
NVJPEG_MEAN_LEVELS = 1.0      # mean |GPU canvas - CPU canvas| over every pixel, levels of 0-255
NVJPEG_MAX_LEVELS = 48        # largest single-pixel difference


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """48 bench photos: 500 x 375 (or 375 x 500) JPEGs of q90, 4:2:0, as ImageNet's."""
    from backmix.bench.folders import make_bench_folder
    return make_bench_folder(tmp_path_factory.mktemp("photos") / "train", n=48)


@pytest.fixture(scope="module")
def jpeg_digits(digits_root, tmp_path_factory):
    """The bundled digits as JPEGs (a prepared root: train/ and test/), for a training run that decodes on the GPU."""
    from PIL import Image
    root = tmp_path_factory.mktemp("jpeg") / "digits"
    for split in ("train", "test"):
        for png in sorted((digits_root / split).glob("*/*.png")):
            out = root / split / png.parent.name / (png.stem + ".jpg")
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.open(png).convert("RGB").save(out, quality=95)
        ImageIndex.scan(root / split).write()
    return root


def test_nvjpeg_canvases_are_the_cpu_canvases_within_the_bound(photos):
    from backmix.bench.decode_difference import decode_difference
    for mode in ("center", "stretch"):
        d = decode_difference(photos, np.arange(len(photos)), 224, mode, "cuda")
        assert d["images"] == len(photos)
        assert d["mean_abs"] <= NVJPEG_MEAN_LEVELS and d["max_abs"] <= NVJPEG_MAX_LEVELS, d


def test_the_torchvision_backend_on_cuda_is_its_cpu_stream_within_the_bound(photos):
    from backmix.cam_cache import ArrayMaps
    maps = ArrayMaps(np.random.default_rng(2).random((len(photos), 8, 8), dtype=np.float32))

    def batches(device):
        cfg = LoaderConfig(batch_size=16, canvas=128, crop=112, augment="rrc", device=device, num_workers=2)
        loader = make_loader("torchvision", photos, cfg, maps)
        out = []
        for epoch in range(2):
            loader.set_epoch(epoch)
            for b in loader:
                assert b.canvas.device.type == device and b.mixed.device.type == device
                out.append([t.cpu() for t in b])
        return out

    cpu, gpu = batches("cpu"), batches("cuda")
    assert len(cpu) == len(gpu) == 6
    # A canvas difference of L levels is at most L / (255 * std) after normalising; the mix, the crop
    # and the flip move pixels without changing them, the resized crop blends them (no larger).
    bound = NVJPEG_MAX_LEVELS / (255 * min(LoaderConfig().std)) + 1e-5
    for c, g in zip(cpu, gpu):
        canvas, images, mixed, labels, dataset_labels, indices = zip(c, g)
        assert torch.equal(*labels) and torch.equal(*dataset_labels) and torch.equal(*indices)
        diff = (canvas[0].int() - canvas[1].int()).abs().float()
        assert diff.mean() <= NVJPEG_MEAN_LEVELS and diff.max() <= NVJPEG_MAX_LEVELS
        for x, y in (images, mixed):
            assert (x - y).abs().max() <= bound


def test_the_torchvision_backend_reads_no_pixel_back_to_the_host(photos, monkeypatch, pixels_stay_on_the_device):
    import backmix.pipeline.device_decode as device_decode
    devices = []
    real = device_decode.decode_jpeg

    def spy(blobs, **kw):
        devices.append(kw["device"])
        return real(blobs, **kw)
    monkeypatch.setattr(device_decode, "decode_jpeg", spy)
    loader = make_loader("torchvision", photos, LoaderConfig(batch_size=16, canvas=128, crop=112, device="cuda",
                                                             num_workers=0))
    with pixels_stay_on_the_device:
        batches = list(loader)
        x, _ = batches[0].inputs()
    assert len(devices) == len(batches) == 3 and all(torch.device(d).type == "cuda" for d in devices)
    assert x.device.type == "cuda" and batches[0].canvas.device.type == "cuda"


def test_an_amp_channels_last_epoch_decoding_on_the_gpu(jpeg_digits, tmp_path):
    from backmix.trainers import TrainConfig, main
    cfg = TrainConfig(data=str(jpeg_digits), out=str(tmp_path / "run"), epochs=2, device="cuda", amp="auto",
                      channels_last=True, backend="torchvision", workers=2, progress=False, regen_every=1)
    metrics = main(cfg)
    import json
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["regenerated"] == 1           # an in-loop rebuild of GPU-decoded canvases
    assert all(math.isfinite(r["loss"]) and r["images"] > 0 for r in records)
    for key in ("accuracy", "auroc_msp", "auroc_mls", "oscr_msp"):
        assert 0.0 <= metrics[key] <= 1.0


def test_in_loop_cams_of_gpu_decoded_batches_equal_the_separate_pass(digits_root, tmp_path, exact_float32):
    """The training loop's way (the torchvision backend's canvases, on the GPU, fed to the writer) and a
    separate pass on the GPU make the same generation (PNG files: both decode them alike on the CPU)."""
    from backmix.cam_cache import ForegroundCache, GenerationWriter, build_generation, init_cache, rebuild_cache
    from backmix.osr_data.normalize import IMAGENET_MEAN, IMAGENET_STD
    index = ImageIndex.load(digits_root / "train")
    rows = np.arange(0, len(index), 3)
    torch.manual_seed(0)
    model = Classifier32(10, width=0.25).cuda().train()
    common = dict(canvas=40, mean=IMAGENET_MEAN, std=IMAGENET_STD, rows=rows)
    for name in ("loop", "pass"):
        init_cache(tmp_path / name, index)
    writer = GenerationWriter(tmp_path / "loop", model, index, **common)
    loader = make_loader("torchvision", index, LoaderConfig(batch_size=64, device="cuda", num_workers=2), indices=rows)
    for batch in loader:
        assert batch.canvas.device.type == "cuda"
        writer.add_canvases(batch.canvas, batch.indices)
    assert rebuild_cache(tmp_path / "loop", model, index, writer=writer, num_workers=0, device="cuda",
                         progress=False, **common) == 1
    assert build_generation(tmp_path / "pass", model, index, num_workers=0, device="cuda", progress=False,
                            **common) == 1
    loop = np.asarray(ForegroundCache(tmp_path / "loop").maps, np.float32)
    sep = np.asarray(ForegroundCache(tmp_path / "pass").maps, np.float32)
    assert not np.all(loop[rows] == 0.5)
    # CAMs taken in other batch compositions may differ by a float32 ulp: at most one float16 step
    assert np.abs(loop - sep).max() <= 2.0 ** -11


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA GPU")
@pytest.mark.parametrize("backend", ["reference", "torchvision"])
def test_a_loader_named_cuda_1_serves_on_it_whichever_gpu_is_current(tiny_root, backend):
    with torch.cuda.device(0):
        loader = make_loader(backend, ImageIndex.load(tiny_root), LoaderConfig(batch_size=8, device="cuda:1",
                                                                               num_workers=0))
        batch = next(iter(loader))
    assert {t.device for t in (batch.canvas, batch.images, batch.mixed, batch.labels)} == {torch.device("cuda", 1)}
