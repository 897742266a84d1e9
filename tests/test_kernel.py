"""The mix kernel against a plain per-sample loop, and its invariants."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from backmix.pipeline import BackMixSampler, box_size, crop_flip, fill_value, mix_backgrounds, top_k_mask
from backmix.pipeline.backmix import backmix


def loop_top_k(maps: np.ndarray, ratio: float, tie_break: np.ndarray) -> np.ndarray:
    b, g, _ = maps.shape
    k = max(1, int(round(ratio * g * g)))
    out = np.zeros((b, g * g), bool)
    for i in range(b):
        flat = maps[i].reshape(-1)
        rank_in_tie = np.empty(g * g, int)
        rank_in_tie[tie_break[i]] = np.arange(g * g)
        order = sorted(range(g * g), key=lambda c: (-flat[c], rank_in_tie[c]))
        out[i, order[:k]] = True
    return out.reshape(b, g, g)


def loop_mix(images, partners, masks, boxes, box_hw, fill):
    b, c, h, w = images.shape
    g = masks.shape[-1]
    bh, bw = box_hw
    out = images.copy()
    for i in range(b):
        j = partners[i]
        pixel_mask = np.kron(masks[j], np.ones((h // g, w // g), dtype=bool))
        background = np.where(pixel_mask[None], fill[:, None, None], images[j])
        sy, sx, dy, dx = boxes[i]
        out[i, :, dy:dy + bh, dx:dx + bw] = background[:, sy:sy + bh, sx:sx + bw]
    return out


def random_case(seed, b=7, canvas=40, grid=8, levels=3, dtype=np.uint8):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (b, 3, canvas, canvas)).astype(dtype)
    # Few distinct levels so that ties are common and the tie rule is exercised.
    maps = (rng.integers(0, levels, (b, grid, grid)) / (levels - 1)).astype(np.float32)
    sampler = BackMixSampler(canvas=canvas, crop=32, grid=grid, seed=seed)
    return images, maps, sampler.draw(b, epoch=seed, step=1), sampler


@pytest.mark.parametrize("seed", range(6))
def test_top_k_mask_equals_loop(seed):
    _, maps, p, _ = random_case(seed)
    got = top_k_mask(torch.from_numpy(maps), 0.25, torch.from_numpy(p.tie_break)).numpy()
    np.testing.assert_array_equal(got, loop_top_k(maps, 0.25, p.tie_break))
    assert (got.reshape(len(maps), -1).sum(1) == 16).all()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_mix_equals_loop_bitwise(seed, dtype):
    images, maps, p, sampler = random_case(seed, dtype=dtype)
    masks = loop_top_k(maps, 0.25, p.tie_break)
    fill = fill_value((0.485, 0.456, 0.406)).numpy().astype(dtype)
    got = mix_backgrounds(torch.from_numpy(images), torch.from_numpy(p.partners), torch.from_numpy(masks),
                          torch.from_numpy(p.boxes), sampler.box_hw, torch.from_numpy(fill)).numpy()
    want = loop_mix(images, p.partners, masks, p.boxes, sampler.box_hw, fill)
    assert got.dtype == images.dtype
    assert np.array_equal(got, want)


def test_only_the_box_changes_and_holds_partner_background_or_blank():
    images, maps, p, sampler = random_case(11, b=16)
    t = {k: torch.from_numpy(v) for k, v in dict(maps=maps, tie=p.tie_break).items()}
    fill = fill_value((0.485, 0.456, 0.406))
    mixed = backmix(torch.from_numpy(images), t["maps"], torch.from_numpy(p.partners), t["tie"],
                    torch.from_numpy(p.boxes), top_k_ratio=0.25, box_hw=sampler.box_hw, fill=fill).numpy()
    masks = loop_top_k(maps, 0.25, p.tie_break)
    bh, bw = sampler.box_hw
    for i in range(16):
        sy, sx, dy, dx = p.boxes[i]
        outside = np.ones((40, 40), bool)
        outside[dy:dy + bh, dx:dx + bw] = False
        assert np.array_equal(mixed[i][:, outside], images[i][:, outside])
        j = p.partners[i]
        box = mixed[i][:, dy:dy + bh, dx:dx + bw]
        fg = np.kron(masks[j], np.ones((5, 5), bool))[sy:sy + bh, sx:sx + bw]
        assert np.array_equal(box[:, ~fg], images[j][:, sy:sy + bh, sx:sx + bw][:, ~fg])
        assert (box[:, fg] == fill.numpy()[:, None]).all()


def test_partner_is_never_self_and_lends_once():
    sampler = BackMixSampler(canvas=40, crop=32, seed=3)
    for b in (2, 3, 5, 64, 257):
        for step in range(20):
            partners = sampler.draw(b, epoch=0, step=step).partners
            assert (partners != np.arange(b)).all()
            assert np.array_equal(np.sort(partners), np.arange(b))


def test_partners_are_spread_over_the_batch():
    # Over many draws, the partner of image 0 is uniform over the other B-1 images.
    sampler = BackMixSampler(canvas=40, crop=32, seed=5)
    counts = np.bincount([sampler.draw(6, 0, s).partners[0] for s in range(3000)], minlength=6)
    assert counts[0] == 0
    expected = 3000 / 5
    chi2 = ((counts[1:] - expected) ** 2 / expected).sum()
    assert chi2 < 20.5  # chi-square, 4 degrees of freedom, p ~ 0.0004


def test_boxes_and_crops_cover_the_valid_range_uniformly():
    sampler = BackMixSampler(canvas=40, crop=32, box_fraction=0.25, seed=9)
    p = [sampler.draw(256, 0, s) for s in range(40)]
    boxes = np.concatenate([q.boxes for q in p])
    crops = np.concatenate([q.crops for q in p])
    flips = np.concatenate([q.flips for q in p])
    assert sampler.box_hw == (10, 10)
    assert boxes.min() == 0 and boxes.max() == 30
    assert crops.min() == 0 and crops.max() == 8
    assert abs(boxes.mean() - 15) < 0.3 and abs(crops.mean() - 4) < 0.1
    assert abs(flips.mean() - 0.5) < 0.02


def test_same_key_same_params_other_key_other_params():
    a = BackMixSampler(canvas=40, crop=32, seed=1)
    b = BackMixSampler(canvas=40, crop=32, seed=1)
    for f in ("partners", "boxes", "tie_break", "crops", "flips"):
        assert np.array_equal(getattr(a.draw(32, 2, 5), f), getattr(b.draw(32, 2, 5), f))
    assert not np.array_equal(a.draw(32, 2, 5).boxes, a.draw(32, 2, 6).boxes)
    assert not np.array_equal(a.draw(32, 2, 5).boxes, a.draw(32, 3, 5).boxes)
    assert not np.array_equal(a.draw(32, 2, 5).boxes, a.draw(32, 2, 5, rank=1).boxes)


def test_a_lone_image_is_left_unmixed():
    images, maps, p, sampler = random_case(0, b=1)
    out = mix_backgrounds(torch.from_numpy(images), torch.zeros(1, dtype=torch.long),
                          torch.zeros(1, 8, 8, dtype=torch.bool), torch.zeros(1, 4, dtype=torch.long),
                          sampler.box_hw, fill_value((0.5, 0.5, 0.5)))
    assert torch.equal(out, torch.from_numpy(images))


def test_crop_flip_equals_slicing():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 3, 40, 40), dtype=np.uint8)
    offsets = rng.integers(0, 9, (5, 2))
    flips = np.array([True, False, True, False, False])
    got = crop_flip(torch.from_numpy(images), torch.from_numpy(offsets), torch.from_numpy(flips), 32).numpy()
    for i in range(5):
        y, x = offsets[i]
        want = images[i, :, y:y + 32, x:x + 32]
        assert np.array_equal(got[i], want[:, :, ::-1] if flips[i] else want)


def test_box_size_rounds_fraction_of_each_side():
    assert box_size((256, 256), 0.25) == (64, 64)
    assert box_size((40, 48), 0.25) == (10, 12)
