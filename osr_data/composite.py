"""``digits-on-photos``: a data set with a fore-background prior, built from bundled parts only.

BackMix exists because a classifier learns the background of its classes as
much as their foreground, and an unknown object on a familiar background is
then taken for a known class. This data set builds that prior on purpose:

- foreground: scikit-learn's handwritten digits (the classes), white strokes
  with a dark halo so they read on any photograph;
- background: crops of the real photographs scikit-image and scikit-learn carry.
  Every class has "its" photograph. A training image of class c sits on a crop
  of c's photograph with probability ``prior`` and on a random other photograph
  otherwise; test images, known and unknown alike, sit on a photograph drawn
  uniformly from all of them.

The split of digits into train and test is that of ``digits`` (same seed), so
results on the two data sets compare image for image.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import BackMixError
from .split_folder import write_split

# Real photographs bundled with scikit-image (no download needed) and scikit-learn.
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "hubble_deep_field",
                  "retina", "immunohistochemistry", "grass", "gravel", "brick", "camera", "moon", "coins")
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
BACKGROUND_DIMMING = 0.75   # backgrounds are dimmed so the white strokes stay the brightest thing in an image


@lru_cache(maxsize=2)
def bundled_photos(short_side: int = 96) -> tuple[np.ndarray, ...]:
    """The bundled photographs as uint8 HxWx3, scaled so the shorter side is ``short_side``."""
    import skimage.data
    from sklearn.datasets import load_sample_image

    photos = [getattr(skimage.data, name)() for name in SKIMAGE_PHOTOS]
    photos = [p[0] if isinstance(p, tuple) else p for p in photos]  # stereo_motorcycle: (left, right, disparity)
    photos += [load_sample_image(name) for name in SKLEARN_PHOTOS]
    out = []
    for p in photos:
        p = np.asarray(p)
        if p.ndim == 2:
            p = np.repeat(p[..., None], 3, axis=-1)
        p = p[..., :3]
        if p.dtype != np.uint8:  # some are float or bool
            p = (255 * (p.astype(np.float64) / max(float(p.max()), 1e-9))).astype(np.uint8)
        h, w = p.shape[:2]
        s = short_side / min(h, w)
        out.append(np.asarray(Image.fromarray(p).resize((max(short_side, round(w * s)),
                                                         max(short_side, round(h * s))), Image.BILINEAR)))
    return tuple(out)


def random_crop(photo: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``size`` x ``size`` crop of ``photo``, mirrored with probability 1/2."""
    h, w = photo.shape[:2]
    y, x = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
    crop = photo[y:y + size, x:x + size]
    return crop[:, ::-1] if rng.random() < 0.5 else crop


def composite(digit: np.ndarray, background: np.ndarray, rng: np.random.Generator,
              digit_size: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Alpha-blend one 8x8 digit (0..16) onto a square uint8 background at a random place.

    Returns the image and the digit's box (y, x, height, width) in its pixels: the ground truth
    foreground a CAM's top cells are scored against (``backmix.bench.map_quality``)."""
    size = background.shape[0]
    alpha = np.asarray(Image.fromarray((digit / 16.0 * 255).astype(np.uint8)).resize(
        (digit_size, digit_size), Image.BILINEAR), dtype=np.float32) / 255.0
    # A dark halo (3x3 dilation of the strokes) keeps white strokes visible on bright photographs.
    pad = np.pad(alpha, 1)
    halo = np.max([pad[dy:dy + digit_size, dx:dx + digit_size] for dy in range(3) for dx in range(3)], axis=0)
    y, x = rng.integers(0, size - digit_size + 1, 2)
    out = background.astype(np.float32) * BACKGROUND_DIMMING
    region = out[y:y + digit_size, x:x + digit_size]
    region *= 1.0 - halo[..., None]
    region[:] = region * (1.0 - alpha[..., None]) + 255.0 * alpha[..., None]
    return out.round().clip(0, 255).astype(np.uint8), np.array([y, x, digit_size, digit_size])


def digits_on_photos(prior: float = 0.5, seed: int = 0, size: int = 32) -> dict[str, np.ndarray]:
    """The data set as arrays: ``{train,test}_{images,labels,photos,boxes}``, ``class_photo``, ``names``.

    ``*_photos`` name the photograph each image's background was cut from;
    ``class_photo[c]`` is class c's own photograph; ``*_boxes`` are the digits' boxes
    (y, x, height, width; ``composite``). Image i is written as ``<class>/{i:06d}.png``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 <= prior <= 1.0:
        raise BackMixError(f"--prior must lie in [0, 1], got {prior}")
    digits = load_digits()
    idx = np.arange(len(digits.target))
    tr, te = train_test_split(idx, test_size=0.3, stratify=digits.target, random_state=seed)
    tr, te = np.sort(tr), np.sort(te)
    photos = bundled_photos()
    rng = np.random.default_rng([seed, 0xD16])
    class_photo = rng.permutation(len(photos))[:10]   # class c's own photograph

    def build(rows: np.ndarray, train: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out, used, boxes = [], [], []
        for r in rows:
            c = digits.target[r]
            if train and rng.random() < prior:
                p = class_photo[c]
            else:
                p = rng.integers(len(photos))
                if train:  # "otherwise" means another photograph than the class's own
                    while p == class_photo[c]:
                        p = rng.integers(len(photos))
            image, box = composite(digits.images[r], random_crop(photos[p], size, rng), rng)
            out.append(image)
            used.append(p)
            boxes.append(box)
        return np.stack(out), np.asarray(used), np.stack(boxes)

    train_images, train_photos, train_boxes = build(tr, True)
    test_images, test_photos, test_boxes = build(te, False)
    return {"train_images": train_images, "train_labels": digits.target[tr], "train_photos": train_photos,
            "train_boxes": train_boxes,
            "test_images": test_images, "test_labels": digits.target[te], "test_photos": test_photos,
            "test_boxes": test_boxes,
            "class_photo": class_photo, "names": tuple(f"digit_{d}" for d in range(10))}


def prepare_digits_on_photos(out: Path, seed: int = 0, prior: float = 0.5, **_) -> None:
    d = digits_on_photos(prior=prior, seed=seed)
    write_split(out / "train", d["train_images"], d["train_labels"], d["names"])
    write_split(out / "test", d["test_images"], d["test_labels"], d["names"])
