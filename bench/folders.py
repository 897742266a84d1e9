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

from backmix._fs import atomic_folder
from backmix.osr_data.index import ImageIndex

SIZES = ((500, 375), (375, 500))   # (width, height), landscape 3:1 over portrait


def default_bench_folder(n: int) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "backmix"
    return base / f"bench-photos-{n}"


def make_bench_folder(out: str | os.PathLike, n: int = 1024, seed: int = 0, quality: int = 90) -> ImageIndex:
    """Write ``n`` JPEGs to ``out/<photo>/<i>.jpg`` with index.csv; reuse the folder if it is there."""
    from backmix.osr_data.composite import SKIMAGE_PHOTOS, SKLEARN_PHOTOS, bundled_photos

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


def default_scale_folder(classes: int, per_class: int, source_images: int = 1024) -> Path:
    return default_bench_folder(source_images).parent / f"scale-{classes}x{per_class}-of-{source_images}"


def make_scale_folder(out: str | os.PathLike, classes: int = 1000, per_class: int = 1281, *,
                      test_per_class: int = 2, source_images: int = 1024, progress: bool = True) -> Path:
    """An ImageNet-shaped prepared root: ``out/train/n<class>/<i>.jpg`` (``classes`` x ``per_class``) and
    ``out/test/`` (``test_per_class`` a class), every file a hard link to a JPEG of the bench folder of
    ``source_images`` (so 1.28 M files cost directory entries, not 140 GB). Written once (atomically);
    the index files are left to the first ``ImageIndex.load``, whose time is what a benchmark measures."""
    from tqdm import tqdm

    from backmix.osr_data.errors import BackMixError

    if classes < 2 or per_class < 1 or test_per_class < 1 or source_images < 1:
        raise BackMixError(f"--classes must be >= 2, --per-class and --source-images >= 1, got {classes}, "
                           f"{per_class} and {source_images}")
    out = Path(out)
    if (out / "complete").exists():
        return out
    source = make_bench_folder(default_bench_folder(source_images), source_images)
    files = [source.abspath(i) for i in range(len(source))]
    with atomic_folder(out) as tmp, tqdm(total=classes * (per_class + test_per_class), desc=f"linking {out.name}",
                                         unit="file", disable=not progress, mininterval=2) as bar:
        k = 0
        for split, count in (("train", per_class), ("test", test_per_class)):
            for c in range(classes):
                folder = tmp / split / f"n{c:08d}"
                folder.mkdir(parents=True)
                for i in range(count):
                    os.link(files[k % len(files)], folder / f"{i:06d}.jpg")
                    k += 1
                bar.update(count)
        (tmp / "complete").write_text(f"{classes} classes x {per_class} train + {test_per_class} test images\n")
    return out
