"""Batches a training loop can use (closed-set labels, ``inputs()``, ``loss()``) and mid-epoch resume
of every loader backend (torchdata's ``state_dict`` / ``load_state_dict`` convention)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from backmix.cam_cache import ArrayMaps
from backmix.osr_data import BackMixError, ImageIndex
from backmix.pipeline import LoaderConfig, make_loader

from helpers import state_after  # (helpers also registers the "pil" backend)

BACKENDS = ("reference", "torchvision", "dali", "ffcv", "pil")   # pil: the backend a test adds (helpers.py)


def config(**kw):
    base = dict(batch_size=5, canvas=40, crop=32, num_workers=1, seed=3, device="cpu")
    return LoaderConfig(**{**base, **kw})


@pytest.fixture(scope="module", autouse=True)
def tiny_beton(tiny_root):
    """The FFCV loader reads a beton written once, on purpose: the tiny folder's, at the config's canvas."""
    from backmix.pipeline.beton import write_beton
    from backmix.pipeline.beton_location import beton_locations
    index = ImageIndex.load(tiny_root)
    write_beton(index, beton_locations(index, config().canvas)[0], canvas=config().canvas, progress=False)


def maps_for(index):
    return ArrayMaps(np.random.default_rng(2).random((len(index), 8, 8), dtype=np.float32))


def same(a, b) -> bool:
    return all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a, b))


RECIPES = {"clean+mixed": {}, "mix-prob": {"mix_prob": 0.5}, "two-views": {"backmix": False, "views": 2}}


@pytest.mark.parametrize("backend, recipe", [(b, "clean+mixed") for b in BACKENDS]
                         + [("reference", "mix-prob"), ("reference", "two-views")])
@pytest.mark.parametrize("cut", [2, 5])
def test_a_restored_loader_continues_with_the_batch_it_would_have_made(tiny_root, backend, recipe, cut):
    """Epoch 1 of 5 batches, cut after ``cut`` batches: a fresh loader given the state makes the rest
    (each recipe's stream: a batch is a pure function of the key, its mix draw and second view too)."""
    index = ImageIndex.load(tiny_root)
    cfg = config(**RECIPES[recipe])
    whole = make_loader(backend, index, cfg, maps_for(index))
    whole.set_epoch(1)
    want = list(whole)
    assert len(want) == len(whole) == 5 and whole.state_dict() == {"epoch": 1, "step": 5, "skipped": 0}

    state = state_after(make_loader(backend, index, cfg, maps_for(index)), 1, cut)
    assert state == {"epoch": 1, "step": cut, "skipped": 0}

    second = make_loader(backend, index, cfg, maps_for(index))
    second.load_state_dict(state)
    second.set_epoch(1)          # the epoch of the state: its position is kept
    rest = list(second)
    assert len(rest) == 5 - cut
    for got, ref in zip(rest, want[cut:]):
        assert same(got, ref)
    # the next epoch starts from its first batch
    second.set_epoch(2)
    assert second.state_dict()["step"] == 5 and len(list(second)) == 5


def test_a_loader_state_names_what_is_wrong(tiny_root):
    loader = make_loader("reference", ImageIndex.load(tiny_root), config(num_workers=0))
    for bad in ({"epoch": 0}, {"epoch": 0, "step": 6, "skipped": 0}, {"epoch": -1, "step": 0, "skipped": 0},
                "step 3"):
        with pytest.raises(BackMixError, match="loader state"):
            loader.load_state_dict(bad)


def test_the_skipped_count_is_part_of_the_state(folder_with_a_broken_file):
    index = ImageIndex.load(folder_with_a_broken_file)
    cfg = config(num_workers=0, on_error="skip", shuffle=False)   # the broken row 9 is in batch 1
    loader = make_loader("reference", index, cfg)
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    assert state == {"epoch": 0, "step": 2, "skipped": 1}
    again = make_loader("reference", index, cfg)
    again.load_state_dict(state)
    assert sum(len(b.indices) for b in again) == 14 and again.skipped == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_are_closed_set_under_a_label_map_and_indices_stay_on_the_host(tiny_root, backend):
    index = ImageIndex.load(tiny_root)            # cat, dog, fox: 8 each
    label_map = np.array([1, -1, 0])              # known: fox -> 0, cat -> 1; dog unknown
    known = np.flatnonzero(label_map[index.labels] >= 0)
    batches = list(make_loader(backend, index, config(), maps_for(index), known, label_map=label_map))
    seen = torch.cat([b.indices for b in batches])
    assert sorted(seen.tolist()) == known.tolist()
    for b in batches:
        assert b.indices.device.type == b.dataset_labels.device.type == "cpu"
        assert b.dataset_labels.tolist() == index.labels[b.indices.numpy()].tolist()
        assert b.labels.tolist() == label_map[index.labels[b.indices.numpy()]].tolist()
    # an evaluation loader serves the unknown class too, marked -1
    test = list(make_loader(backend, index, config(train=False, shuffle=False, backmix=False), label_map=label_map))
    assert torch.cat([b.labels for b in test]).tolist() == label_map[index.labels].tolist()
    with pytest.raises(BackMixError, match="8 of the 24 training images belong to classes outside the label map"):
        make_loader(backend, index, config(), label_map=label_map)


@pytest.mark.parametrize("clean, backmix", [(True, True), (False, True), (True, False)])
def test_inputs_and_loss_are_what_a_loop_needs(tiny_root, clean, backmix):
    index = ImageIndex.load(tiny_root)
    b = next(iter(make_loader("reference", index, config(num_workers=0, clean=clean, backmix=backmix),
                              maps_for(index))))
    x, y = b.inputs()
    parts = [t for t in (b.images, b.mixed) if t is not None]
    assert len(parts) == 1 + (clean and backmix)
    assert torch.equal(x, torch.cat(parts)) and torch.equal(y, b.labels.repeat(len(parts)))
    logits = torch.randn(len(x), 3, generator=torch.Generator().manual_seed(0))
    ce = nn.CrossEntropyLoss()
    n = len(b.labels)
    weights = [w for t, w in ((b.images, 0.3), (b.mixed, 2.0)) if t is not None]
    want = sum(w * ce(logits[k * n:(k + 1) * n], b.labels) for k, w in enumerate(weights))
    assert torch.equal(b.loss(ce, logits, clean=0.3, mixed=2.0), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mix_prob_serves_each_image_its_mixed_or_clean_crop_the_same_on_every_backend(tiny_root, backend):
    """One crop per image: the mixed one where the batch's draw (a pure function of seed, epoch, rank and
    step) says so, else the clean one, exactly as that backend's clean + mixed stream has them."""
    from backmix.pipeline.sampling import mixed_rows
    index = ImageIndex.load(tiny_root)
    both = make_loader(backend, index, config(), maps_for(index))
    one = make_loader(backend, index, config(mix_prob=0.5), maps_for(index))
    for loader in (both, one):
        loader.set_epoch(2)
    chosen_anywhere = 0
    for step, (a, b) in enumerate(zip(both, one)):
        chosen = torch.from_numpy(mixed_rows(3, 2, 0, step, len(a.labels), 0.5))
        chosen_anywhere += int(chosen.sum())
        assert b.images is None and b.mixed.shape == a.mixed.shape
        assert torch.equal(b.mixed, torch.where(chosen[:, None, None, None], a.mixed, a.images))
        assert torch.equal(b.inputs()[1], a.labels) and torch.equal(b.indices, a.indices)
    assert 0 < chosen_anywhere < len(index)


def test_mix_prob_draws_are_a_pure_function_of_the_batch_key_with_share_p():
    from backmix.pipeline.sampling import mixed_rows
    key = (7, 3, 1, 11)
    assert np.array_equal(mixed_rows(*key, 64, 0.3), mixed_rows(*key, 64, 0.3))
    others = [mixed_rows(*(key[:i] + (key[i] + 1,) + key[i + 1:]), 64, 0.3) for i in range(4)]
    assert all(not np.array_equal(o, mixed_rows(*key, 64, 0.3)) for o in others)
    for p in (0.25, 0.5, 0.9):
        n_batches, b = 157, 64                             # 10,048 images
        k = sum(int(mixed_rows(0, e, 0, s, b, p).sum()) for e in range(2) for s in range(n_batches // 2 + 1))
        n = b * 2 * (n_batches // 2 + 1)
        assert abs(k - n * p) <= 4 * np.sqrt(n * p * (1 - p)), (p, k / n)   # 4 sigma: fails ~1 in 16,000
    assert not mixed_rows(0, 0, 0, 0, 64, 0.0).any() and mixed_rows(0, 0, 0, 0, 64, 1.0).all()


def test_two_views_are_two_independent_clean_crops_of_each_image(tiny_root):
    """The compute-matched baseline: the first view is the one-view baseline's crop, bit for bit; the
    second another crop and flip of the same canvas, drawn from a stream of its own."""
    index = ImageIndex.load(tiny_root)
    one = list(make_loader("reference", index, config(backmix=False)))
    two = list(make_loader("reference", index, config(backmix=False, views=2, keep_canvas=False)))
    differ = 0
    for a, b in zip(one, two):
        assert b.mixed is None and a.second is None and b.canvas is None
        assert torch.equal(a.images, b.images) and b.second.shape == b.images.shape
        differ += int((b.second != b.images).flatten(1).any(1).sum())
        x, y = b.inputs()
        assert torch.equal(x, torch.cat([b.images, b.second])) and torch.equal(y, b.labels.repeat(2))
        logits = torch.randn(len(x), 3, generator=torch.Generator().manual_seed(1))
        ce, n = nn.CrossEntropyLoss(), len(b.labels)
        assert torch.equal(b.loss(ce, logits, clean=0.3, mixed=2.0),
                           0.3 * ce(logits[:n], b.labels) + 2.0 * ce(logits[n:], b.labels))
    assert differ >= 0.8 * len(index)   # a crop and flip of 9 x 9 x 2 choices repeats rarely
    for bad, message in ((dict(views=2), "backmix=False"), (dict(views=3, backmix=False), "views must be"),
                         (dict(mix_prob=0.5, backmix=False), "needs backmix"), (dict(mix_prob=1.5), r"\(0, 1\]")):
        with pytest.raises(BackMixError, match=message):
            config(**bad)
