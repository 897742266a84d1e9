"""``crop_from="image"``: RandomResizedCrop cut from the whole image, in its own pixel coordinates.

- The boxes follow torchvision's ``RandomResizedCrop.get_params`` on the image's size (two-sample
  KS tests at fixed seeds on area, ratio and centre), its central fallback exactly.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp
from torchvision.transforms import RandomResizedCrop

from backmix.osr_data import BackMixError
from backmix.pipeline import BackMixSampler
from backmix.pipeline.sampling import RRC_RATIO, RRC_SCALE

PHOTO_HW = (375, 500)   # the bench photos' size: height, width


def image_sampler(seed: int = 0, **kw) -> BackMixSampler:
    return BackMixSampler(canvas=40, crop=32, augment="rrc", crop_from="image", seed=seed, **kw)


def test_image_boxes_follow_torchvisions_law_on_the_photo_size():
    n = 20000
    p = image_sampler(seed=3).draw(n, 0, 0, sizes=np.tile(PHOTO_HW, (n, 1)))
    torch.manual_seed(0)
    photo = torch.zeros(1, *PHOTO_HW)
    tv = np.array([RandomResizedCrop.get_params(photo, list(RRC_SCALE), list(RRC_RATIO)) for _ in range(n)])
    height, width = PHOTO_HW

    def stats(top, left, h, w):
        return h * w / (height * width), w / h, left + w / 2, top + h / 2

    ours = stats(p.crops[:, 0], p.crops[:, 1], p.crop_sizes[:, 0], p.crop_sizes[:, 1])
    theirs = stats(*tv.T)
    for name, a, b in zip(("area", "ratio", "centre x", "centre y"), ours, theirs):
        assert ks_2samp(a, b).pvalue > 0.01, name
    assert (p.crops >= 0).all() and (p.crops + p.crop_sizes <= PHOTO_HW).all()
    # Boxes wider than the canvas's side reach the image's sides, which a centre canvas never shows.
    assert (p.crops[:, 1] == 0).any() and (p.crops[:, 1] + p.crop_sizes[:, 1] == width).any()


@pytest.mark.parametrize("hw", [(1000, 10), (10, 1000)])
def test_an_image_without_a_fitting_candidate_takes_torchvisions_central_fallback(hw):
    # No candidate box fits a 1000 x 10 image (nor a 10 x 1000 one); torchvision's with a scale of 2
    # never fits either: both take the fallback, the central crop with its ratio clamped.
    p = image_sampler(seed=1).draw(64, 0, 0, sizes=np.tile(hw, (64, 1)))
    fallback = RandomResizedCrop.get_params(torch.zeros(1, *hw), [2.0, 2.0], list(RRC_RATIO))
    assert fallback[2:] != hw
    assert (p.crops == fallback[:2]).all() and (p.crop_sizes == fallback[2:]).all()


def test_image_boxes_are_drawn_in_each_images_own_size_and_keep_the_other_draws():
    sizes = np.array([[375, 500], [500, 375], [40, 40], [100, 1000]])
    a = image_sampler(seed=5).draw(4, 2, 3, sizes=sizes)
    assert (a.crops + a.crop_sizes <= sizes).all()
    b = image_sampler(seed=5).draw(4, 2, 3, sizes=sizes)
    assert np.array_equal(a.crops, b.crops) and np.array_equal(a.crop_sizes, b.crop_sizes)
    canvas = BackMixSampler(canvas=40, crop=32, augment="rrc", seed=5).draw(4, 2, 3)
    for k in ("partners", "boxes", "tie_break", "flips"):
        assert np.array_equal(getattr(a, k), getattr(canvas, k))
    # Evaluation keeps the canvas's centre crop.
    ev = image_sampler(seed=5).draw(4, 2, 3, train=False)
    assert (ev.crops == 4).all() and (ev.crop_sizes == 32).all()


def test_crop_from_image_needs_sizes_and_rrc():
    with pytest.raises(ValueError, match="sizes must be"):
        image_sampler().draw(4, 0, 0)
    with pytest.raises(BackMixError, match="needs augment='rrc'"):
        BackMixSampler(canvas=40, crop=32, crop_from="image")
    with pytest.raises(BackMixError, match="crop_from must be one of canvas, image"):
        BackMixSampler(canvas=40, crop=32, augment="rrc", crop_from="photo")
