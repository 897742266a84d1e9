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
    from backmix.pipeline.beton import beton_locations, write_beton
    index = ImageIndex.load(tiny_root)
    write_beton(index, beton_locations(index, config().canvas)[0], canvas=config().canvas, progress=False)


def maps_for(index):
    return ArrayMaps(np.random.default_rng(2).random((len(index), 8, 8), dtype=np.float32))


def same(a, b) -> bool:
    return all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cut", [2, 5])
def test_a_restored_loader_continues_with_the_batch_it_would_have_made(tiny_root, backend, cut):
    """Epoch 1 of 5 batches, cut after ``cut`` batches: a fresh loader given the state makes the rest."""
    index = ImageIndex.load(tiny_root)
    cfg = config()
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
