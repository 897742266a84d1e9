"""The canvas modes and the augmentation after the mix, held to torchvision.

- Canvases: "center" is torchvision Resize(S) + CenterCrop(S), "stretch" Resize((S, S)), exactly
  (the v2 tensor transforms, on uint8 tensors, as every stage decodes).
- RandomResizedCrop: ``BackMixSampler`` draws its boxes (vectorised, keyed by seed/epoch/rank/step);
  their distribution is torchvision's ``RandomResizedCrop.get_params``'s (two-sample KS tests at fixed
  seeds); ``resized_crop_flip`` equals torchvision's ``resized_crop`` (bilinear, antialias off) + hflip
  of each image to 1e-3 grey levels: both compute in float32, the one from a table of source
  coordinates, the other from its own scale factor, so the weights differ in the last bits.
- The reference loader's evaluation path is Resize(canvas) + CenterCrop(canvas) + CenterCrop(crop).
- A cache records its canvas mode; a loader or build of the other mode is refused with one line.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from backmix.cam_cache import ForegroundCache, init_cache
from backmix.cam_cache.generation_file import MappedMaps, write_maps
from backmix.cam_cache.store import generation_path
from backmix.osr_data import BackMixError, ImageIndex, decode_rgb
from backmix.osr_data.decode import to_canvas
from backmix.pipeline import BackMixSampler, LoaderConfig, ReferenceLoader, make_loader, normalize
from backmix.pipeline.augment import crop_flip, resized_crop_flip
from backmix.pipeline.sampling import RRC_RATIO, RRC_SCALE

GREY_ATOL = 1e-3   # grey levels (0..255): float32 weights from a table vs from torch's scale factor


@pytest.mark.parametrize("hw", [(40, 48), (48, 40), (37, 53), (64, 64), (20, 90)])
@pytest.mark.parametrize("size", [32, 40, 57])
def test_centre_canvas_is_torchvision_resize_and_centre_crop(hw, size):
    image = torch.randint(0, 256, (3, *hw), dtype=torch.uint8, generator=torch.Generator().manual_seed(sum(hw)))
    want = T.CenterCrop(size)(T.Resize(size, antialias=True)(image))
    assert torch.equal(to_canvas(image, size, "center"), want)
    assert torch.equal(to_canvas(image, size, "stretch"), T.Resize((size, size), antialias=True)(image))


def test_centre_is_the_default_and_a_bad_mode_is_named():
    image = torch.zeros(3, 40, 48, dtype=torch.uint8)
    assert torch.equal(to_canvas(image, 32), to_canvas(image, 32, "center"))
    with pytest.raises(BackMixError, match=r"--canvas-mode \(canvas_mode\) must be one of center, stretch"):
        to_canvas(image, 32, "squash")
    with pytest.raises(BackMixError, match=r"--augment \(augment\) must be one of crop, rrc"):
        LoaderConfig(augment="cutout")


def rrc_boxes(sampler, steps, batch=500):
    p = [sampler.draw(batch, 0, step) for step in range(steps)]
    return np.concatenate([q.crops for q in p]), np.concatenate([q.crop_sizes for q in p])


def test_rrc_boxes_lie_in_the_canvas_with_scale_and_ratio_in_range():
    canvas = 64
    corners, sizes = rrc_boxes(BackMixSampler(canvas=canvas, crop=56, augment="rrc", seed=4), 4)
    assert (corners >= 0).all() and (sizes >= 1).all() and (corners + sizes <= canvas).all()
    h, w = sizes[:, 0].astype(float), sizes[:, 1].astype(float)
    full = (h == canvas) & (w == canvas)   # torchvision's fallback: the whole (square) canvas
    # Up to the rounding of each side to whole pixels (half a pixel on each).
    area = h * w / canvas ** 2
    assert area.min() >= RRC_SCALE[0] * 0.9 and area.max() <= 1.0
    ratio = w / h
    ok = ((ratio >= RRC_RATIO[0] * (1 - 1 / h)) & (ratio <= RRC_RATIO[1] * (1 + 1 / h))) | full
    assert ok.all()
    # Every corner position the box leaves free is used.
    small = sizes[:, 0] < canvas // 2
    assert corners[small, 0].min() == 0 and (corners[small, 0] + sizes[small, 0]).max() == canvas


def test_rrc_boxes_are_a_pure_function_of_the_key():
    a = BackMixSampler(canvas=64, crop=56, augment="rrc", seed=1)
    b = BackMixSampler(canvas=64, crop=56, augment="rrc", seed=1)
    for key in [(0, 0, 0), (3, 7, 1)]:
        p, q = a.draw(16, *key), b.draw(16, *key)
        assert np.array_equal(p.crops, q.crops) and np.array_equal(p.crop_sizes, q.crop_sizes)
    base = a.draw(16, 0, 0, 0)
    for other in [a.draw(16, 1, 0, 0), a.draw(16, 0, 1, 0), a.draw(16, 0, 0, 1),
                  BackMixSampler(canvas=64, crop=56, augment="rrc", seed=2).draw(16, 0, 0, 0)]:
        assert not np.array_equal(base.crop_sizes, other.crop_sizes)


def test_rrc_keeps_the_mix_draw_and_crop_keeps_its_stream():
    crop = BackMixSampler(canvas=64, crop=56, seed=5).draw(16, 2, 3)
    rrc = BackMixSampler(canvas=64, crop=56, augment="rrc", seed=5).draw(16, 2, 3)
    for k in ("partners", "boxes", "tie_break", "flips"):
        assert np.array_equal(getattr(crop, k), getattr(rrc, k))
    assert (crop.crop_sizes == 56).all() and not (rrc.crop_sizes == 56).all()
    # Evaluation: the centre crop at torchvision CenterCrop's corner, no flip, no resize.
    ev = BackMixSampler(canvas=39, crop=32, augment="rrc", seed=5).draw(16, 2, 3, train=False)
    assert (ev.crops == int(round(7 / 2.0))).all() and (ev.crop_sizes == 32).all() and not ev.flips.any()


@pytest.mark.parametrize("canvas", [64, 224])
def test_rrc_boxes_follow_torchvisions_distribution(canvas):
    """KS two-sample tests (fixed seeds, 4000 boxes each) on the area fraction, the log aspect ratio and
    the corner's place in its free range; p > 0.01 for all (the draws are deterministic)."""
    corners, sizes = rrc_boxes(BackMixSampler(canvas=canvas, crop=32, augment="rrc", seed=11), 8)
    torch.manual_seed(0)
    image = torch.zeros(1, canvas, canvas)
    tv = np.array([RandomResizedCrop.get_params(image, list(RRC_SCALE), list(RRC_RATIO)) for _ in range(4000)])

    def stats(top, h, w):
        free = np.maximum(canvas - h, 1)
        return h * w / canvas ** 2, np.log(w / h), top / free

    ours = stats(corners[:, 0], sizes[:, 0], sizes[:, 1])
    theirs = stats(tv[:, 0], tv[:, 2], tv[:, 3])
    for name, a, b in zip(("area", "log ratio", "corner"), ours, theirs):
        assert ks_2samp(a, b).pvalue > 0.01, name
    # And the share of fallback boxes (the whole canvas) is torchvision's, within sampling error.
    full = ((sizes == canvas).all(1)).mean(), ((tv[:, 2:] == canvas).all(1)).mean()
    assert abs(full[0] - full[1]) < 0.01


def test_resized_crop_flip_equals_torchvision_per_image():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (24, 3, 64, 64), dtype=torch.uint8, generator=g)
    p = BackMixSampler(canvas=64, crop=56, augment="rrc", seed=3).draw(24, 0, 0).torch()
    for size in (56, 17):    # up- and downscaling
        out = resized_crop_flip(images, p["crops"], p["crop_sizes"], p["flips"], size)
        assert out.dtype == torch.float32 and out.shape == (24, 3, size, size)
        for i in range(24):
            (top, left), (h, w) = p["crops"][i].tolist(), p["crop_sizes"][i].tolist()
            want = TF.resized_crop(images[i].float(), top, left, h, w, [size, size], antialias=False)
            want = want.flip(-1) if p["flips"][i] else want
            assert (out[i] - want).abs().max() <= GREY_ATOL, i


@pytest.mark.parametrize("canvas, crop, augment", [(64, 56, "rrc"), (64, 17, "rrc"), (40, 32, "crop"), (48, 48, "crop")])
def test_the_per_image_cpu_crops_equal_the_batched_gather_bit_for_bit(canvas, crop, augment):
    """The CPU crops image by image (whole rows and columns), a GPU gathers the batch: same pixels."""
    images = torch.randint(0, 256, (19, 3, canvas, canvas), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    p = BackMixSampler(canvas=canvas, crop=crop, augment=augment, seed=2).draw(19, 1, 5).torch()
    if augment == "rrc":
        def run(per_image):
            return resized_crop_flip(images, p["crops"], p["crop_sizes"], p["flips"], crop, per_image)
    else:
        def run(per_image):
            return crop_flip(images, p["crops"], p["flips"], crop, per_image)
    per_image, batched = run(True), run(False)
    assert per_image.dtype == batched.dtype and torch.equal(per_image, batched)
    assert p["flips"].any() and not p["flips"].all()


@pytest.mark.parametrize("canvas, crop", [(64, 56), (64, 17), (40, 33)])
def test_the_mixed_crop_made_from_the_clean_one_is_the_mixed_canvases_crop_bit_for_bit(canvas, crop):
    """On the CPU the mixed resized crop is the clean one resampled again only where it reads the pasted
    box (``resized_crops_clean_and_mixed``): exactly the crop of the mixed canvas (normalised or not),
    boxes at the edges, resampled up and down, mirrored or not, the lone image of a batch too."""
    from backmix.pipeline import fill_value, mix_backgrounds, top_k_mask
    from backmix.osr_data.normalize import Normalize
    from backmix.pipeline.augment import resized_crops_clean_and_mixed
    gen = torch.Generator().manual_seed(canvas + crop)
    for n in (31, 1):
        images = torch.randint(0, 256, (n, 3, canvas, canvas), dtype=torch.uint8, generator=gen)
        sampler = BackMixSampler(canvas=canvas, crop=crop, augment="rrc", seed=3)
        p = sampler.draw(n, 2, 7).torch()
        p["boxes"][:4, 2:] = torch.tensor([[0, 0], [canvas - sampler.box_hw[0], canvas - sampler.box_hw[1]],
                                           [0, canvas - sampler.box_hw[1]], [canvas - sampler.box_hw[0], 0]])[:n]
        masks = top_k_mask(torch.rand(n, 8, 8, generator=gen), 0.25, p["tie_break"])
        mixed = mix_backgrounds(images, p["partners"], masks, p["boxes"], sampler.box_hw, fill_value((0.5,) * 3))
        for after_crop in (None, Normalize()):
            clean, mixed_crops = resized_crops_clean_and_mixed(images, mixed, p["crops"], p["crop_sizes"], p["flips"],
                                                               crop, p["boxes"], sampler.box_hw, after_crop)
            after_crop = after_crop or (lambda x: x)
            crop_of = lambda x: after_crop(resized_crop_flip(x, p["crops"], p["crop_sizes"], p["flips"], crop))
            assert torch.equal(clean, crop_of(images)) and torch.equal(mixed_crops, crop_of(mixed))
            assert n == 1 or not torch.equal(mixed_crops, clean)


def test_a_box_of_the_crop_size_is_the_plain_crop():
    images = torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    corners = torch.tensor([[0, 0], [8, 8], [3, 5], [8, 0]])
    flips = torch.tensor([False, True, False, True])
    out = resized_crop_flip(images, corners, torch.full((4, 2), 32), flips, 32)
    for i, (y, x) in enumerate(corners.tolist()):
        want = images[i, :, y:y + 32, x:x + 32].float()
        assert torch.equal(out[i], want.flip(-1) if flips[i] else want)


def config(**kw):
    base = dict(batch_size=8, canvas=64, crop=56, num_workers=0, seed=0, device="cpu")
    base.update(kw)
    return LoaderConfig(**base)


def test_reference_rrc_batches_are_the_torch_op_on_the_mixed_canvas(tiny_root):
    from backmix.cam_cache import ArrayMaps
    from backmix.pipeline import fill_value, mix_backgrounds, top_k_mask
    index = ImageIndex.load(tiny_root)
    maps = ArrayMaps(np.random.default_rng(0).random((len(index), 8, 8), dtype=np.float32))
    cfg = config(augment="rrc")
    sampler = cfg.sampler()
    mean, std = torch.tensor(cfg.mean), torch.tensor(cfg.std)
    for step, b in enumerate(ReferenceLoader(index, cfg, maps)):
        want = torch.stack([to_canvas(decode_rgb(index.abspath(int(i))), 64, "center") for i in b.indices])
        assert torch.equal(b.canvas, want)
        p = sampler.draw(len(b.indices), 0, step).torch()
        masks = top_k_mask(torch.from_numpy(maps.gather(b.indices.numpy())), cfg.top_k_ratio, p["tie_break"])
        mixed = mix_backgrounds(b.canvas, p["partners"], masks, p["boxes"], sampler.box_hw, fill_value(cfg.mean))
        for got, src in ((b.images, b.canvas), (b.mixed, mixed)):
            assert torch.equal(got, normalize(resized_crop_flip(src, p["crops"], p["crop_sizes"], p["flips"], 56),
                                              mean, std))


@pytest.mark.parametrize("canvas,crop", [(64, 56), (40, 33)])
@pytest.mark.parametrize("augment", ["crop", "rrc"])
def test_reference_evaluation_is_resize_centre_crop_then_centre_crop(tiny_root, canvas, crop, augment):
    index = ImageIndex.load(tiny_root)
    cfg = config(canvas=canvas, crop=crop, train=False, backmix=False, shuffle=False, augment=augment)
    tv = T.Compose([T.Resize(canvas, antialias=True), T.CenterCrop(canvas), T.CenterCrop(crop)])
    b = next(iter(ReferenceLoader(index, cfg)))
    want = torch.stack([tv(decode_rgb(index.abspath(int(i)))) for i in b.indices])
    assert torch.equal(b.images, normalize(want, torch.tensor(cfg.mean), torch.tensor(cfg.std)))


def test_a_cache_records_its_canvas_mode_and_refuses_the_other(tiny_root, tmp_path):
    index = ImageIndex.load(tiny_root)
    init_cache(tmp_path / "c", index, canvas_mode="stretch")
    cache = ForegroundCache(tmp_path / "c", index=index)
    assert cache.canvas_mode == "stretch"
    with pytest.raises(BackMixError, match="'stretch' canvases, expected 'center'"):
        ForegroundCache(tmp_path / "c", index=index, canvas_mode="center")
    with pytest.raises(BackMixError, match="--canvas-mode"):
        init_cache(tmp_path / "c", index, canvas_mode="center")
    with pytest.raises(BackMixError, match="made on 'stretch' canvases, the loader makes 'center'"):
        make_loader("reference", index, config(), cache)
    assert make_loader("reference", index, config(canvas_mode="stretch"), cache) is not None


def test_a_cache_file_without_a_canvas_mode_is_refused_in_one_line(tmp_path):
    path = generation_path(tmp_path, 0)
    write_maps(path, np.arange(3), np.zeros(3, np.int64), np.full((3, 8, 8), 0.5, np.float16), {"generation": 0})
    with pytest.raises(BackMixError, match=r"cache file .* was written by an earlier backmix \(backmix-foreground-"
                                           r"cache/3, no canvas mode\): delete its cache folder; `backmix cache "
                                           r"init` rewrites it$") as e:
        MappedMaps(path)
    assert "\n" not in str(e.value)
    write_maps(path, np.arange(3), np.zeros(3, np.int64), np.full((3, 8, 8), 0.5, np.float16),
               {"generation": 0, "canvas_mode": "stretch"})
    assert MappedMaps(path).canvas_mode == "stretch"
