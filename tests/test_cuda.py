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
from backmix.cam_cache.models import Classifier32
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
