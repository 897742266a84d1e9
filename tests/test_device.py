"""One device choice (``backmix.device.choose_device``) for the loaders, the CAM pass and the benchmarks."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from backmix.cam_cache import compute_cams
from backmix.device import announce_device, choose_device
from backmix.models import build_model
from backmix.osr_data import BackMixError, ImageIndex
from backmix.osr_data.normalize import IMAGENET_MEAN, IMAGENET_STD
from backmix.pipeline import config as loader_config

NO_CUDA = "--device cuda was asked for, but CUDA is not available on this machine"


def test_the_loaders_choose_with_the_same_function():
    assert loader_config.choose_device is choose_device


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only answers")
def test_without_cuda_auto_is_the_cpu_and_cuda_is_one_error():
    assert choose_device("auto") == choose_device("cpu") == choose_device(torch.device("cpu")) == torch.device("cpu")
    for request in ("cuda", "cuda:1", torch.device("cuda", 0)):
        with pytest.raises(BackMixError) as err:
            choose_device(request)
        assert str(err.value) == NO_CUDA


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only answers")
def test_the_trainer_chooses_with_the_same_function(monkeypatch):
    from backmix.trainers import distributed
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed.init_distributed("auto") == distributed.init_distributed("cpu") == (torch.device("cpu"), 0, 1)
    with pytest.raises(BackMixError) as err:
        distributed.init_distributed("cuda")
    assert str(err.value) == NO_CUDA
    asked = []
    monkeypatch.setattr(distributed, "choose_device", lambda r, cuda_index: asked.append((r, cuda_index)) or
                        torch.device("cpu"))
    monkeypatch.setenv("LOCAL_RANK", "3")
    distributed.init_distributed("auto")
    assert asked == [("auto", 3)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_with_cuda_auto_is_the_current_device_or_the_local_rank():
    assert choose_device("auto") == choose_device("cuda") == torch.device("cuda", torch.cuda.current_device())
    assert choose_device("cuda", cuda_index=0) == choose_device("cuda:0") == torch.device("cuda", 0)


def test_a_device_torch_does_not_know_is_one_error():
    with pytest.raises(BackMixError, match=r"device must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        choose_device("gpu")


def test_the_choice_is_logged_once_a_process(caplog):
    announce_device.cache_clear()
    with caplog.at_level(logging.INFO, logger="backmix"):
        choose_device("cpu"), choose_device("cpu"), choose_device("auto" if not torch.cuda.is_available() else "cpu")
    assert caplog.text.count("mixing on cpu") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only answer")
def test_the_cam_pass_asked_for_cuda_without_one_says_so(tiny_root):
    index = ImageIndex.load(tiny_root)
    rows = np.arange(4)
    with pytest.raises(BackMixError) as err:
        compute_cams(build_model("cnn32", 3, width=0.25), index, rows, index.labels[rows], canvas=40, grid=8,
                     mean=IMAGENET_MEAN, std=IMAGENET_STD, num_workers=0, device="cuda", progress=False)
    assert str(err.value) == NO_CUDA
