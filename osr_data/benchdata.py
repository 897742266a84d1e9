"""The benchmark image folder: real photographs at ImageNet-like sizes, built from bundled ones.

ImageNet's median image is about 500 x 375 JPEG at quality ~90. The 16 real
photographs scikit-image and scikit-learn carry are cut into random crops
(random scale, place and flip), resized to 500 x 375 or 375 x 500 and saved
as JPEG q90 in the ImageNet layout, one class per source photograph. The
folder is written once (atomically) and reused, so a benchmark times reading
and decoding files from the page cache, not making them.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from .index import ImageIndex
from .prepare import atomic_folder

SIZES = ((500, 375), (375, 500))   # (width, height), landscape 3:1 over portrait


def default_bench_folder(n: int) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "backmix"
    return base / f"bench-photos-{n}"


def make_bench_folder(out: str | os.PathLike, n: int = 1024, seed: int = 0, quality: int = 90) -> ImageIndex:
    """Write ``n`` JPEGs to ``out/<photo>/<i>.jpg`` with index.csv; reuse the folder if it is there."""
    from .composite import SKIMAGE_PHOTOS, SKLEARN_PHOTOS, bundled_photos

    out = Path(out)
    if (out / "index.csv").exists():
        index = ImageIndex.load(out)
        if len(index) == n:
            return index
    photos = bundled_photos(short_side=600)
    names = [n_.split(".")[0] for n_ in SKIMAGE_PHOTOS + SKLEARN_PHOTOS]
    rng = np.random.default_rng(seed)
    with atomic_folder(out) as tmp:
        for name in names:
            (tmp / name).mkdir()
        for i in range(n):
            p = int(rng.integers(len(photos)))
            photo = photos[p]
            w, h = SIZES[0] if rng.random() < 0.75 else SIZES[1]
            ph, pw = photo.shape[:2]
            scale = rng.uniform(0.5, 1.0) * min(ph / h, pw / w)
            ch, cw = int(h * scale), int(w * scale)
            y, x = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
            crop = Image.fromarray(photo[y:y + ch, x:x + cw]).resize((w, h), Image.BILINEAR)
            if rng.random() < 0.5:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            crop.save(tmp / names[p] / f"{i:06d}.jpg", quality=quality)
        # Classes with no image would be empty folders; drop them so labels stay 0..C-1.
        for name in names:
            if not any((tmp / name).iterdir()):
                (tmp / name).rmdir()
        ImageIndex.scan(tmp).write()
    return ImageIndex.load(out)
