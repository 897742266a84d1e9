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
from backmix.pipeline import LoaderConfig, core, make_loader

NO_CUDA = "--device cuda was asked for, but CUDA is not available on this machine"
CUDA_1 = torch.device("cuda", 1)


def test_the_loaders_choose_with_the_same_function():
    assert core.choose_device is choose_device


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


def test_a_loader_config_holds_the_device_it_names():
    assert LoaderConfig(device="cuda:1").device == CUDA_1
    assert LoaderConfig(device=torch.device("cuda", 2)).device == torch.device("cuda", 2)
    assert LoaderConfig(device="cuda").device == torch.device("cuda")   # the current one, when a loader takes it
    assert LoaderConfig(device="cpu").device == torch.device("cpu")
    assert LoaderConfig().device == torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:x", "cuda:-1", "CUDA", " cpu", "cuda:1:2", "mps"])
def test_a_device_name_that_names_none_is_one_line(bad):
    with pytest.raises(BackMixError) as err:
        LoaderConfig(device=bad)
    assert str(err.value) == f"device must be auto, cpu, cuda or cuda:N, got {bad!r}"
    with pytest.raises(BackMixError, match="device must be auto, cpu, cuda or cuda:N, got device"):
        LoaderConfig(device=torch.device("meta"))


def test_a_device_of_another_kind_is_a_type_error():
    with pytest.raises(TypeError, match=r"^device must be a string or a torch.device, not int \(1\)$"):
        LoaderConfig(device=1)


def test_the_trainer_hands_its_loaders_the_device_it_chose(small_root, tmp_path):
    from backmix.trainers.config import TrainConfig
    from backmix.trainers.run_data import loader_config
    cfg = TrainConfig(data=str(small_root), out=str(tmp_path / "run"), split="ant,bee", device="cuda:1")
    assert loader_config(cfg, CUDA_1, train=True).device == CUDA_1
    assert loader_config(cfg, CUDA_1, train=False).device == CUDA_1
    with pytest.raises(BackMixError, match="^device must be auto, cpu, cuda or cuda:N, got 'gpu'$"):
        TrainConfig(data=str(small_root), out=str(tmp_path / "run"), split="ant,bee", device="gpu")


@pytest.mark.parametrize("command", [["train", "--data", "d", "--out", "o"], ["eval", "--checkpoint", "c", "--data", "d"],
                                     ["cache", "build", "--checkpoint", "c", "--data", "d", "--cache", "k"]])
def test_the_command_lines_take_cuda_n_and_refuse_a_wrong_name_in_one_line(command, capsys):
    from backmix.cli import build_parser, main
    assert build_parser(command).parse_args(command + ["--device", "cuda:1"]).device == "cuda:1"
    with pytest.raises(SystemExit) as done:
        main(command + ["--device", "gpu"])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "backmix: error: argument --device: device must be auto, cpu, cuda or cuda:N, got 'gpu'")


@pytest.fixture()
def loader_on_cuda_1(monkeypatch, tiny_root):
    """``make_loader(backend, ...)`` with device cuda:1, made where no such GPU exists: the device choice
    passes the named device on (what it does where the GPU is) and records what it was asked."""
    asked = []
    monkeypatch.setattr(core, "choose_device", lambda request: asked.append(request) or request)
    index = ImageIndex.load(tiny_root)

    def make(backend):
        loader = make_loader(backend, index, LoaderConfig(batch_size=4, num_workers=0, device="cuda:1"))
        assert asked == [CUDA_1] and loader.device == CUDA_1
        return loader
    yield make


def test_the_reference_source_serves_the_loaders_gpu(loader_on_cuda_1):
    loader = loader_on_cuda_1("reference")
    assert loader.source._loader.pin_memory and not loader.source.transform_in_workers   # the GPU transforms batches
    loader.close()


def test_the_torchvision_source_decodes_on_the_loaders_gpu(loader_on_cuda_1, monkeypatch):
    from backmix.pipeline import torchvision_loader
    loader = loader_on_cuda_1("torchvision")
    seen = []
    canvas = torch.zeros(3, 40, 40, dtype=torch.uint8)
    monkeypatch.setattr(torchvision_loader, "jpeg_canvases",
                        lambda blobs, paths, size, mode, device: seen.append(("jpeg", device)) or [canvas] * len(blobs))
    monkeypatch.setattr(torchvision_loader, "to_device", lambda t, device: seen.append(("other", device)) or t)
    batch = torchvision_loader.EncodedBatch([(0, True), (1, False)], torch.zeros(10, dtype=torch.uint8), [10],
                                            torch.zeros(1, 3, 40, 40, dtype=torch.uint8))
    canvases, rows, failed = loader.source.canvases_of(batch)
    assert seen == [("jpeg", CUDA_1), ("other", CUDA_1)]
    assert canvases.shape == (2, 3, 40, 40) and rows.tolist() == [0, 1] and failed == []
    loader.close()


def test_the_dali_pipeline_runs_on_the_loaders_gpu(loader_on_cuda_1, monkeypatch):
    dali = pytest.importorskip("nvidia.dali")
    built = []

    class Pipe:
        def build(self):
            pass

    def pipeline_def(**kwargs):
        built.append(kwargs["device_id"])
        return lambda definition: Pipe
    monkeypatch.setattr(dali, "pipeline_def", pipeline_def)
    loader = loader_on_cuda_1("dali")
    assert loader.source.gpu and built == [1]
    loader.close()


def test_the_launchers_variables_are_read_in_one_place_and_a_bad_one_is_one_line(monkeypatch):
    from backmix.cam_cache.cli import parse_shard
    from backmix.cam_cache.ranks import launched_as
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert launched_as() == (0, 1, 0) and parse_shard(None) == (0, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launched_as() == (3, 4, 1) and parse_shard(None) == (3, 4)
    monkeypatch.setenv("WORLD_SIZE", "four")
    with pytest.raises(BackMixError) as err:
        parse_shard(None)
    assert str(err.value) == "the environment variable WORLD_SIZE must be a whole number, got 'four'"
