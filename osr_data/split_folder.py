"""Images held as an array, written as one split's folder: ``root/<class>/<image>`` and its ``index.csv``
(what a user's own ImageNet-style folder looks like). Every bundled data set is written by it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .index import ImageIndex


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
