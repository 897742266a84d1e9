"""``crop_from="image"``: RandomResizedCrop cut from the whole image, in its own pixel coordinates.

- The boxes follow torchvision's ``RandomResizedCrop.get_params`` on the image's size (two-sample
  KS tests at fixed seeds on area, ratio and centre), its central fallback exactly.
- The reference stream: images whose pixels encode their coordinates prove each crop is its box of
  the whole image; the mix maps the canvas box onto each image (and is the canvas mix on images of
  the canvas's size); workers finishing batches make the loading process's stream.
- FFCV, from a beton written with ``--whole-images`` (each image's file), makes the reference stream bit
  for bit; a beton without the files, or whose files are not the indexed ones, is refused in one line.
- The option reaches the loader from ``backmix train`` and ``backmix.loader``; a registered backend that
  cannot make the stream refuses it in one line. (Ray and torchvision are held to the reference stream in
  tests/test_ray.py and tests/test_torchvision_loader.py.)
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


# --- the reference stream: crops cut from the whole image ------------------------------------------

# Images whose pixels say where they are: red = row, green = column, blue = 40 * (which image + 1).
SIZES = [(60, 200), (150, 90), (120, 120), (80, 240), (200, 50), (90, 160)]


def coordinate_image(k: int, hw: tuple[int, int]) -> np.ndarray:
    h, w = hw
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([y, x, np.full_like(y, 40 * (k + 1))], axis=-1).astype(np.uint8)


@pytest.fixture(scope="module")
def coordinate_root(tmp_path_factory):
    from PIL import Image
    root = tmp_path_factory.mktemp("coords") / "train"
    for k, hw in enumerate(SIZES):
        folder = root / ("a" if k % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(coordinate_image(k, hw)).save(folder / f"{k}.png")
    return root


def image_config(**kw) -> "LoaderConfig":
    from backmix.pipeline import LoaderConfig
    base = dict(batch_size=6, canvas=40, crop=16, augment="rrc", crop_from="image", canvas_mode="stretch",
                mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), num_workers=0, device="cpu", shuffle=False)
    return LoaderConfig(**{**base, **kw})


def stream(root, config, backend="reference", maps=None, epochs=(0, 1), **options):
    from backmix.osr_data import ImageIndex
    from backmix.pipeline import make_loader
    index = ImageIndex.scan(root)
    loader = make_loader(backend, index, config, maps=maps, **options)
    try:
        out = []
        for epoch in epochs:
            loader.set_epoch(epoch)
            out += [(epoch, step, batch) for step, batch in enumerate(loader)]
        return index, loader, out
    finally:
        loader.close()


def pixel_sources(start: int, length: int, size: int) -> np.ndarray:
    """Where output pixel r of a bilinear resize (pixel centres) of ``length`` source pixels samples."""
    pos = (np.arange(size) + 0.5) * length / size - 0.5
    return start + np.clip(pos, 0, length - 1)


def test_a_clean_crop_is_its_box_of_the_whole_image_resized(coordinate_root):
    from backmix.osr_data import ImageIndex
    index = ImageIndex.scan(coordinate_root)
    real = {i: SIZES[int(index.abspath(i).rsplit("/", 1)[1].split(".")[0])] for i in range(len(index))}
    config = image_config(backmix=False)
    _, loader, batches = stream(coordinate_root, config)
    seen_wide = False
    for epoch, step, batch in batches:
        rows = batch.indices.numpy()
        sizes = np.array([real[r] for r in rows])
        p = loader.sampler.draw(len(rows), epoch, step, sizes=sizes)
        crops = batch.images.numpy() * 255.0
        for k, row in enumerate(rows):
            (top, left), (h, w) = p.crops[k], p.crop_sizes[k]
            ys, xs = pixel_sources(top, h, 16), pixel_sources(left, w, 16)
            if p.flips[k]:
                xs = xs[::-1]
            np.testing.assert_allclose(crops[k, 0], np.repeat(ys[:, None], 16, 1), atol=1e-3)
            np.testing.assert_allclose(crops[k, 1], np.repeat(xs[None, :], 16, 0), atol=1e-3)
            name = int(index.abspath(row).rsplit("/", 1)[1].split(".")[0])
            assert np.allclose(crops[k, 2], 40 * (name + 1))
            seen_wide |= w > min(sizes[k]) or h > min(sizes[k])   # more than a centre canvas could show
    assert seen_wide


def test_the_mix_in_image_pixels_is_the_canvas_mix_on_canvas_sized_images():
    from backmix.pipeline.backmix import mix_backgrounds, mix_image_backgrounds
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 40, 40), dtype=torch.uint8, generator=g)
    masks = torch.rand(5, 8, 8, generator=g) < 0.3
    partners = torch.tensor([1, 2, 3, 4, 0])
    boxes = torch.randint(0, 31, (5, 4), generator=g)
    fill = torch.tensor([1, 2, 3], dtype=torch.uint8)
    want = mix_backgrounds(images, partners, masks, boxes, (10, 10), fill)
    got = mix_image_backgrounds(images, torch.full((5, 2), 40), partners, masks, boxes, (10, 10), 40, fill)
    assert torch.equal(got, want)


def test_the_mix_in_image_pixels_maps_the_canvas_box_onto_each_image():
    from backmix.pipeline.backmix import mix_image_backgrounds
    sizes = torch.tensor([[60, 200], [150, 90], [80, 240]])
    images = torch.zeros(3, 3, 150, 240, dtype=torch.uint8)
    for k, (h, w) in enumerate(sizes.tolist()):
        images[k, :, :h, :w] = torch.from_numpy(coordinate_image(k, (h, w))).permute(2, 0, 1)
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[:, :4, :] = True            # the top half of every image is foreground
    partners = torch.tensor([1, 2, 0])
    boxes = torch.tensor([[20, 4, 0, 30], [16, 0, 12, 8], [28, 30, 30, 2]])   # src_y, src_x, dst_y, dst_x
    fill = torch.tensor([7, 7, 7], dtype=torch.uint8)
    out = mix_image_backgrounds(images, sizes, partners, masks, boxes, (10, 10), 40, fill)
    for i, j in enumerate(partners.tolist()):
        (h, w), (ph, pw) = sizes[i].tolist(), sizes[j].tolist()
        y0, y1 = boxes[i, 2] * h // 40, (boxes[i, 2] + 10) * h // 40
        x0, x1 = boxes[i, 3] * w // 40, (boxes[i, 3] + 10) * w // 40
        sy0, sy1 = boxes[i, 0] * ph // 40, (boxes[i, 0] + 10) * ph // 40
        sx0, sx1 = boxes[i, 1] * pw // 40, (boxes[i, 1] + 10) * pw // 40
        inside = torch.zeros(150, 240, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        assert torch.equal(out[i][:, ~inside], images[i][:, ~inside])   # untouched outside the box
        pasted = out[i][:, y0:y1, x0:x1].long()
        blank = (pasted == 7).all(0)
        got = pasted[:, ~blank]
        # Every pasted pixel is the partner's, from its mapped box, in order; the blanks its foreground.
        assert (got[2] == 40 * (j + 1)).all()
        assert got[0].min() >= sy0 and got[0].max() < sy1 and got[1].min() >= sx0 and got[1].max() < sx1
        src_rows = pasted[0][:, 0] if not blank[:, 0].all() else None
        ys = sy0 + (2 * torch.arange(y1 - y0) + 1) * (sy1 - sy0) // (2 * (y1 - y0))
        foreground = ys * 8 // ph < 4
        assert torch.equal(blank.all(1), foreground) and torch.equal(blank.any(1), foreground)
        assert src_rows is None or torch.equal(src_rows[~foreground], ys[~foreground])


def test_the_clean_and_mixed_crops_are_one_box_of_the_whole_and_the_mixed_image(coordinate_root):
    from backmix.cam_cache import ArrayMaps
    from backmix.osr_data import ImageIndex
    from backmix.pipeline.augment import normalize, resized_crop_flip
    from backmix.pipeline.backmix import mix_image_backgrounds, top_k_mask
    from backmix.osr_data.canvas_reads import pad_photos
    from backmix.osr_data.decode import decode_rgb
    index = ImageIndex.scan(coordinate_root)
    maps = ArrayMaps(np.random.default_rng(1).random((len(index), 8, 8), dtype=np.float32))
    config = image_config()
    _, loader, batches = stream(coordinate_root, config, maps=maps)
    for epoch, step, batch in batches:
        rows = batch.indices.numpy()
        photos = pad_photos([decode_rgb(index.abspath(r)) for r in rows])
        p = loader.sampler.draw(len(rows), epoch, step, sizes=photos.sizes.numpy())
        t = {k: torch.from_numpy(v) for k, v in vars(p).items()}
        masks = top_k_mask(torch.from_numpy(maps.gather(rows)), 0.25, t["tie_break"])
        mixed = mix_image_backgrounds(photos.pixels, photos.sizes, t["partners"], masks, t["boxes"], (10, 10), 40,
                                      torch.zeros(3, dtype=torch.uint8))
        for name, source in (("images", photos.pixels), ("mixed", mixed)):
            want = normalize(resized_crop_flip(source, t["crops"], t["crop_sizes"], t["flips"], 16),
                             torch.zeros(3), torch.ones(3))
            assert torch.equal(getattr(batch, name), want), name
        assert not torch.equal(batch.images, batch.mixed)
    # The canvas a batch carries (what the CAMs see) is the whole image stretched.
    assert batches[0][2].canvas.shape[-2:] == (40, 40)


@pytest.mark.parametrize("options", [dict(), dict(backmix=False, views=2), dict(clean=False)])
def test_workers_finishing_the_batches_make_the_loading_processs_stream(coordinate_root, options):
    from backmix.cam_cache import ArrayMaps
    maps = ArrayMaps(np.random.default_rng(4).random((len(SIZES), 8, 8), dtype=np.float32))
    _, _, want = stream(coordinate_root, image_config(batch_size=4, num_workers=0, **options), maps=maps)
    _, _, got = stream(coordinate_root, image_config(batch_size=4, num_workers=2, **options), maps=maps)
    assert len(got) == len(want) == 4
    for (_, _, g), (_, _, w) in zip(got, want):
        for name in ("canvas", "images", "mixed", "second", "indices"):
            x, y = getattr(g, name), getattr(w, name)
            assert (x is None and y is None) or torch.equal(x, y), name


def test_crop_from_image_is_refused_where_it_cannot_be_made():
    from backmix.pipeline import LoaderConfig
    with pytest.raises(BackMixError, match="needs canvas_mode='stretch'"):
        LoaderConfig(augment="rrc", crop_from="image")
    with pytest.raises(BackMixError, match="needs augment='rrc'"):
        LoaderConfig(canvas_mode="stretch", crop_from="image")
    # Evaluation keeps the canvas's centre crop: nothing to cut from the image.
    assert not image_config(train=False).crops_images and image_config().crops_images


def test_backmix_train_crop_from_image_reaches_the_training_loader(small_root, tmp_path):
    from backmix.cli import main as cli_main
    from backmix.trainers.config import TrainConfig
    from backmix.trainers.run_data import loader_config
    run = tmp_path / "run"
    assert cli_main(["train", "--data", str(small_root), "--out", str(run), "--epochs", "1", "--width", "0.25",
                     "--batch-size", "8", "--known", "ant,cat", "--workers", "0", "--device", "cpu",
                     "--no-progress", "--augment", "rrc", "--canvas-mode", "stretch", "--crop-from", "image",
                     "--regen-every", "1"]) in (0, None)
    cfg = TrainConfig.load(run / "config.json")
    assert cfg.crop_from == "image"
    assert loader_config(cfg, torch.device("cpu"), train=True).crops_images
    assert not loader_config(cfg, torch.device("cpu"), train=False).crops_images   # evaluation: the canvas


# --- FFCV: a beton that holds each image's file ---------------------------------------------------------

@pytest.fixture(scope="module")
def whole_beton(coordinate_root):
    """The coordinate images' beton as ``write-beton --whole-images`` writes it by default (where the
    FFCV loader looks): stretched raw canvases and each image's file."""
    from backmix.cli import main as cli_main
    from backmix.osr_data import ImageIndex
    from backmix.pipeline.beton_location import find_beton
    assert cli_main(["data", "write-beton", "--data", str(coordinate_root), "--canvas", "40", "--canvas-mode",
                     "stretch", "--whole-images", "--no-progress"]) == 0
    return find_beton(ImageIndex.scan(coordinate_root), 40, "stretch")


# The canvas path reads the same beton's canvases as ever (``mix_in="torch"``: the torch op, bit for bit).
@pytest.mark.parametrize("options, ffcv_options",
                         [(dict(), {}), (dict(backmix=False, views=2), {}), (dict(clean=False, keep_canvas=True), {}),
                          (dict(num_workers=2), {}), (dict(crop_from="canvas", keep_canvas=True), dict(mix_in="torch"))],
                         ids=["crop-from-image", "two-views", "mixed-only-canvas", "two-decode-threads",
                              "canvas-from-the-same-beton"])
def test_ffcv_from_a_beton_with_the_files_makes_the_reference_stream(coordinate_root, whole_beton, options,
                                                                     ffcv_options):
    from backmix.cam_cache import ArrayMaps
    maps = ArrayMaps(np.random.default_rng(4).random((len(SIZES), 8, 8), dtype=np.float32))
    config = image_config(batch_size=4, **options)
    _, loader, got = stream(coordinate_root, config, "ffcv", maps=maps, **ffcv_options)
    _, _, want = stream(coordinate_root, config, maps=maps)
    assert loader.source.beton == whole_beton and loader.source.kind == "decode"
    assert len(got) == len(want) == 4
    for (_, _, g), (_, _, w) in zip(got, want):
        for name in ("canvas", "images", "mixed", "second", "indices", "labels"):
            x, y = getattr(g, name), getattr(w, name)
            assert (x is None and y is None) or torch.equal(x, y), name
    assert any(getattr(got[0][2], name) is not None for name in ("canvas", "second"))


def test_ffcv_refuses_a_beton_without_the_files_naming_the_command_that_writes_them(coordinate_root, tmp_path):
    from backmix.osr_data import ImageIndex
    from backmix.pipeline import make_loader
    from backmix.pipeline.beton import write_beton
    index = ImageIndex.scan(coordinate_root)
    beton = write_beton(index, tmp_path / "canvases.beton", canvas=40, canvas_mode="stretch", progress=False).path
    with pytest.raises(BackMixError, match=f"{beton} holds no image files, .* rewrite it with `backmix data "
                                           f"write-beton --data {coordinate_root} --canvas 40 --canvas-mode stretch "
                                           f"--whole-images --out {beton} --force`") as e:
        make_loader("ffcv", index, image_config(), beton=beton)
    assert "\n" not in str(e.value)
    make_loader("ffcv", index, image_config(crop_from="canvas"), beton=beton).close()   # canvases: as ever
    with pytest.raises(BackMixError, match="are mixed by the torch batch transform: use mix_in='torch' or 'auto'"):
        make_loader("ffcv", index, image_config(), beton=beton, mix_in="ffcv")


def test_backmix_train_backend_ffcv_crop_from_image_names_the_option_then_trains(small_root, tmp_path, capsys):
    """Without betons, then with betons of canvases only: one line naming ``--whole-images`` each time, before
    any work; with them, a run."""
    import shutil
    from backmix.cli import main as cli_main
    root = tmp_path / "data"
    shutil.copytree(small_root, root, ignore=shutil.ignore_patterns(".backmix-betons"))
    words = ["train", "--data", str(root), "--out", str(tmp_path / "run"), "--epochs", "1", "--width", "0.25",
             "--batch-size", "8", "--known", "ant,cat", "--workers", "0", "--device", "cpu", "--no-progress",
             "--augment", "rrc", "--canvas-mode", "stretch", "--crop-from", "image", "--backend", "ffcv"]
    write = ["data", "write-beton", "--data", str(root), "--canvas", "40", "--canvas-mode", "stretch", "--no-progress"]

    def one_line_error() -> str:
        capsys.readouterr()
        assert cli_main(words) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("backmix: error: "), err
        return err

    assert f"write them with `backmix data write-beton --data {root} --canvas 40 --canvas-mode stretch " \
           "--whole-images`" in one_line_error()
    assert cli_main(write) == 0
    assert f"holds none: rewrite the betons with `backmix data write-beton --data {root} --canvas 40 --canvas-mode " \
           "stretch --whole-images --force`" in one_line_error()
    assert not (tmp_path / "run").exists()
    assert cli_main(write + ["--whole-images", "--force"]) == 0
    assert cli_main(words) in (0, None)
    assert (tmp_path / "run" / "last.pt").exists()


def test_ffcv_refuses_a_beton_whose_files_are_not_the_indexed_ones(coordinate_root, whole_beton, tmp_path):
    """A beton is a user file: a file's length must be the indexed one and its bytes inside the beton, or
    the loader would read past the beton's end or hold whatever length it claims."""
    from ffcv.reader import Reader
    from ffcv.types import HeaderType
    from backmix.osr_data import ImageIndex
    from backmix.pipeline import make_loader
    index = ImageIndex.scan(coordinate_root)
    index.sizes = index.sizes.copy()
    index.sizes[2] += 1
    with pytest.raises(BackMixError, match=f"does not hold the file of {index.abspath(2)} as .*index.csv records "
                                           "it: rewrite it with `backmix data write-beton"):
        make_loader("ffcv", index, image_config(), beton=whole_beton)
    # A file's address past the beton's end (and one so large it would wrap), its length the indexed one.
    reader = Reader(str(whole_beton))
    victim = ImageIndex.scan(coordinate_root).abspath(3)
    for address in (whole_beton.stat().st_size - 10, 2 ** 64 - 5):
        bad = tmp_path / "bad.beton"
        bad.write_bytes(whole_beton.read_bytes())
        meta = np.memmap(bad, reader.metadata_type, "r+", HeaderType.itemsize + reader.field_descriptors.nbytes,
                         (reader.num_samples,))
        meta["f4"]["ptr"][3] = address
        meta.flush()
        del meta
        with pytest.raises(BackMixError, match=f"does not hold the file of {victim}"):
            make_loader("ffcv", ImageIndex.scan(coordinate_root), image_config(), beton=bad)


def test_a_registered_backend_with_its_own_decode_refuses_crops_from_the_image(coordinate_root):
    from helpers import PilSource
    from backmix.osr_data import ImageIndex
    from backmix.pipeline import make_loader
    index = ImageIndex.scan(coordinate_root)
    assert PilSource.whole_images_refused
    with pytest.raises(BackMixError, match="backend 'pil' cannot cut crops from the whole image .*its decode "
                                           "makes canvases only"):
        make_loader("pil", index, image_config())
    make_loader("pil", index, image_config(train=False)).close()   # evaluation: the canvas, as ever


def test_backmix_loader_takes_crop_from(small_root):
    import backmix
    kw = dict(split="ant,cat", batch_size=4, canvas=32, crop=24, num_workers=0, device="cpu", augment="rrc",
              canvas_mode="stretch")
    image = backmix.loader(small_root, crop_from="image", **kw)
    canvas = backmix.loader(small_root, **kw)
    assert image.config.crop_from == "image" and canvas.config.crop_from == "canvas"
    a, b = next(iter(image)), next(iter(canvas))
    assert a.images.shape == b.images.shape == (4, 3, 24, 24)
    # The 32 x 32 images are their own stretched canvases: the same boxes on the same pixels.
    assert torch.equal(a.images, b.images) and torch.equal(a.mixed, b.mixed)
    image.close()
    canvas.close()


def test_the_batched_resized_crop_a_gpu_runs_reads_padded_images_as_the_cpus_does():
    from backmix.osr_data.canvas_reads import pad_photos
    from backmix.pipeline.augment import resized_crop_flip
    g = torch.Generator().manual_seed(3)
    photos = pad_photos([torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in SIZES])
    p = image_sampler(seed=2).draw(len(SIZES), 0, 0, sizes=photos.sizes.numpy())
    t = {k: torch.from_numpy(getattr(p, k)) for k in ("crops", "crop_sizes", "flips")}
    args = (photos.pixels, t["crops"], t["crop_sizes"], t["flips"], 16)
    assert torch.equal(resized_crop_flip(*args, per_image=False), resized_crop_flip(*args, per_image=True))
