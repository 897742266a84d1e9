"""``backmix data prepare``: write a bundled data set to disk in the ImageNet layout.

No download is possible, so the default data set is real labeled images that an
installed package carries: scikit-learn's handwritten digits (1,797 scans of 10
classes, 8 x 8 at 17 grey levels), upscaled to 32 x 32 RGB PNGs. The layout is
``out/train/<class>/<image>.png`` and ``out/test/<class>/<image>.png``, each with
its ``index.csv``, exactly what a user's own ImageNet-style folder looks like.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from .errors import BackMixError
from .index import ImageIndex

SPLITS = ("train", "test")


def digits_arrays(size: int = 32, seed: int = 0):
    """(train_images, train_labels, test_images, test_labels, class_names) of the digits, uint8 HxWx3."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    imgs = (digits.images / 16.0 * 255.0).round().astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in imgs])
    big = np.repeat(big[..., None], 3, axis=-1)
    idx = np.arange(len(big))
    tr, te = train_test_split(idx, test_size=0.3, stratify=digits.target, random_state=seed)
    names = tuple(f"digit_{d}" for d in range(10))
    return big[np.sort(tr)], digits.target[np.sort(tr)], big[np.sort(te)], digits.target[np.sort(te)], names


def write_split(root: Path, images: np.ndarray, labels: np.ndarray, names: tuple[str, ...],
                fmt: str = "png", quality: int = 95) -> ImageIndex:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / name).mkdir(exist_ok=True)
    for i, (im, lab) in enumerate(zip(images, labels)):
        path = root / names[lab] / f"{i:06d}.{fmt}"
        Image.fromarray(im).save(path, quality=quality) if fmt == "jpg" else Image.fromarray(im).save(path)
    index = ImageIndex.scan(root)
    index.write()
    return index


def prepare_digits(out: Path, seed: int = 0, **_) -> None:
    xtr, ytr, xte, yte, names = digits_arrays(seed=seed)
    write_split(out / "train", xtr, ytr, names)
    write_split(out / "test", xte, yte, names)


def _composite(out: Path, **kwargs) -> None:
    from .composite import prepare_digits_on_photos
    prepare_digits_on_photos(out, **kwargs)


DATASETS: dict[str, Callable[..., None]] = {
    "digits": prepare_digits,
    "digits-on-photos": _composite,
}


def is_prepared(out: Path) -> bool:
    return all((out / s / "index.csv").exists() for s in SPLITS)


def prepare(name: str, out: str | os.PathLike, force: bool = False, **kwargs) -> bool:
    """Write data set ``name`` to ``out``; False if it was there already.

    The data set is built in a temporary folder beside ``out`` and renamed into
    place, so an interrupted prepare leaves nothing half written.
    """
    if name not in DATASETS:
        raise BackMixError(f"unknown data set {name!r} (choose from {', '.join(DATASETS)})")
    out = Path(out)
    if out.exists():
        if is_prepared(out) and not force:
            return False
        if any(out.iterdir()) and not force:
            raise BackMixError(f"{out} exists and is not a prepared data set; pass --force to replace it")
    with atomic_folder(out) as tmp:
        DATASETS[name](tmp, **kwargs)
    return True


@contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out``, on failure it goes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
