"""Shared fixtures: one prepared copy of the bundled digits per test session."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from backmix.osr_data.index import ImageIndex
from backmix.osr_data.prepare import prepare
from backmix.osr_data.split_folder import write_split


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """The bundled digits in the ImageNet layout: root/train and root/test."""
    root = tmp_path_factory.mktemp("data") / "digits"
    prepare("digits", root)
    return root


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """A 3-class folder of 24 random 48x40 RGB PNGs (8 a class); non-square on purpose."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("tiny") / "train"
    images = rng.integers(0, 256, (24, 40, 48, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(3), 8)
    write_split(root, images, labels, ("cat", "dog", "fox"))
    return root


@pytest.fixture(scope="session")
def small_root(tmp_path_factory) -> Path:
    """root/train (12 a class) and root/test (6 a class) of random 32x32 RGB images, 4 classes (ant, bee,
    cat, dog): the trainer's tests train on it in seconds."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("small")
    for split, per_class in (("train", 12), ("test", 6)):
        labels = np.repeat(np.arange(4), per_class)
        images = rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8)
        images[..., labels % 3] //= 2   # a little class signal, so training has something to learn
        write_split(root / split, images, labels, ("ant", "bee", "cat", "dog"))
    return root


@pytest.fixture()
def folder_with_a_broken_file(tiny_root, tmp_path) -> Path:
    """A copy of the tiny folder in which one PNG does not decode (broken/dog/000009.png), indexed as it is
    (a file changed after indexing is a different failure: the index no longer matches)."""
    root = tmp_path / "broken"
    shutil.copytree(tiny_root, root, ignore=shutil.ignore_patterns("index.csv"))
    (root / "dog" / "000009.png").write_bytes(b"this is not a png")
    ImageIndex.scan(root).write()
    return root


class PixelsToHostGuard:
    """While active (``with guard:``), reading pixels to the host fails the test: ``.cpu()``, ``.numpy()``,
    ``.tolist()``, ``.item()``, ``np.asarray`` or ``.to(cpu)`` of a tensor of 3 or more dimensions whose last
    two both exceed ``grid`` (an image; the g x g foreground maps are not pixels). Built on torch's
    ``TorchFunctionMode``, which sees every tensor method call."""

    READS = {"cpu", "numpy", "tolist", "item", "__array__"}

    def __init__(self, grid: int = 8) -> None:
        import torch
        from torch.overrides import TorchFunctionMode

        guard = self

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = getattr(func, "__name__", "")
                t = args[0] if args else None
                if isinstance(t, torch.Tensor) and t.dim() >= 3 and min(t.shape[-2:]) > guard.grid:
                    targets = [*args[1:], kwargs.get("device")]
                    to_host = name == "to" and any(isinstance(a, (str, torch.device)) and torch.device(a).type == "cpu"
                                                   for a in targets)
                    if name in guard.READS or to_host:
                        raise AssertionError(f"pixels read to the host: Tensor.{name} of {tuple(t.shape)} {t.device}")
                return func(*args, **kwargs)

        self.grid, self.mode = grid, Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


@pytest.fixture()
def pixels_stay_on_the_device() -> PixelsToHostGuard:
    """``with pixels_stay_on_the_device:`` fails on any read of pixels to the host (``PixelsToHostGuard``)."""
    return PixelsToHostGuard()
