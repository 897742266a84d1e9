"""``photo-crops``: an offline set of unknowns, the bundled photographs with no digit on them.

digits-on-photos puts every digit on a crop of one of the bundled photographs;
this set is those backgrounds alone (32 x 32 crops, dimmed the same way), one
class folder per photograph. Pointed at with ``backmix train --open-test
DIR/test``, it asks whether a model calls a familiar background a digit: what a
classifier that learnt the backgrounds of its classes gets wrong, and what
BackMix is meant to cure. Any other image folder (SSB, OpenOOD's sets) is used
the same way.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .composite import BACKGROUND_DIMMING, SKIMAGE_PHOTOS, SKLEARN_PHOTOS, bundled_photos, random_crop
from .split_folder import write_split

CROPS_PER_PHOTO = 12          # per split: 192 test and 192 train images


def photo_names() -> tuple[str, ...]:
    return SKIMAGE_PHOTOS + tuple(name.split(".")[0] for name in SKLEARN_PHOTOS)


def photo_crops(seed: int = 0, size: int = 32, per_photo: int = CROPS_PER_PHOTO) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N, size, size, 3], photograph labels [N]): ``per_photo`` random crops of each."""
    rng = np.random.default_rng([seed, 0xB6])
    photos = bundled_photos()
    images = [(random_crop(p, size, rng).astype(np.float32) * BACKGROUND_DIMMING).round().astype(np.uint8)
              for p in photos for _ in range(per_photo)]
    return np.stack(images), np.repeat(np.arange(len(photos)), per_photo)


def prepare_photo_crops(out: Path, seed: int = 0, **_) -> None:
    for k, split in enumerate(("train", "test")):
        images, labels = photo_crops(seed=seed * 2 + k)
        write_split(out / split, images, labels, photo_names())
