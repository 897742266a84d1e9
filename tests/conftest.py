"""Shared fixtures: one prepared copy of the bundled digits per test session."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from backmix.osr_data.index import ImageIndex
from backmix.osr_data.prepare import prepare, write_split


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
