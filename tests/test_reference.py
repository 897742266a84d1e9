"""The reference loader: the contract, determinism, sharding, and bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from backmix.cam_cache import ArrayMaps
from backmix.osr_data import BackMixError, DecodeError, ImageIndex, decode_canvas
from backmix.pipeline import (BackMixSampler, EpochSampler, LoaderConfig, ReferenceLoader, crop_flip, fill_value,
                      mix_backgrounds, normalize, top_k_mask)


def config(**kw):
    base = dict(batch_size=8, canvas=40, crop=32, num_workers=0, seed=0, device="cpu")
    base.update(kw)
    return LoaderConfig(**base)


def test_batches_follow_the_contract_and_equal_the_kernel(tiny_root):
    index = ImageIndex.load(tiny_root)
    maps = ArrayMaps(np.random.default_rng(0).random((len(index), 8, 8), dtype=np.float32))
    cfg = config()
    loader = ReferenceLoader(index, cfg, maps)
    loader.set_epoch(3)
    batches = list(loader)
    order = EpochSampler(len(index), 8, seed=0).batches(3)
    sampler = BackMixSampler(canvas=40, crop=32, seed=0)
    mean, std = torch.tensor(cfg.mean), torch.tensor(cfg.std)
    assert len(batches) == len(loader) == 3
    for step, (b, pos) in enumerate(zip(batches, order)):
        assert b.indices.tolist() == pos.tolist()
        assert b.labels.tolist() == index.labels[pos].tolist()
        # The canvas is the decoded, resized file; nothing else touched it.
        assert torch.equal(b.canvas, torch.stack([decode_canvas(index.abspath(i), 40) for i in pos]))
        p = sampler.draw(len(pos), 3, step).torch()
        masks = top_k_mask(torch.from_numpy(maps.gather(pos)), 0.25, p["tie_break"])
        mixed = mix_backgrounds(b.canvas, p["partners"], masks, p["boxes"], sampler.box_hw,
                                fill_value(cfg.mean))
        assert torch.equal(b.mixed, normalize(crop_flip(mixed, p["crops"], p["flips"], 32), mean, std))
        assert torch.equal(b.images, normalize(crop_flip(b.canvas, p["crops"], p["flips"], 32), mean, std))


def test_same_seed_same_batches_other_seed_other_batches(tiny_root):
    index = ImageIndex.load(tiny_root)
    a = [b.mixed for b in ReferenceLoader(index, config(seed=4))]
    b = [b.mixed for b in ReferenceLoader(index, config(seed=4))]
    c = [b.mixed for b in ReferenceLoader(index, config(seed=5))]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, c))


def test_workers_give_the_same_stream(tiny_root):
    index = ImageIndex.load(tiny_root)
    a = list(ReferenceLoader(index, config(num_workers=0)))
    b = list(ReferenceLoader(index, config(num_workers=2)))
    assert all(torch.equal(x.mixed, y.mixed) and torch.equal(x.indices, y.indices) for x, y in zip(a, b))


@pytest.mark.parametrize("last_batch", ["keep", "drop"])
def test_two_shards_split_an_epoch(tiny_root, last_batch):
    index = ImageIndex.load(tiny_root)
    seen = [torch.cat([b.indices for b in ReferenceLoader(index, config(batch_size=5, rank=r, world_size=2,
                                                                          last_batch=last_batch))])
            for r in range(2)]
    every = torch.cat(seen).sort().values
    if last_batch == "keep":
        assert every.tolist() == list(range(24))
    else:  # equal full batches per rank, nothing seen twice
        assert len(seen[0]) == len(seen[1]) == 10 and len(set(every.tolist())) == 20


@pytest.mark.parametrize("n, batch, world", [(33, 8, 4), (21, 5, 2), (61, 8, 4), (24, 5, 2), (3, 1, 4)])
def test_every_rank_makes_the_same_steps_and_every_sample_is_kept(n, batch, world):
    """What DDP needs: as many steps on every rank; every sample once, except that a rank short of a step
    repeats its own first sample (only when n = world * steps * batch + t, 0 < t < world)."""
    shards = [EpochSampler(n, batch, seed=4, rank=r, world_size=world) for r in range(world)]
    steps = {len(s.batches(7)) for s in shards}
    assert len(steps) == 1 and steps == {len(s) for s in shards}
    seen = [np.concatenate(s.batches(7)) for s in shards]
    for s, rows in zip(shards, seen):
        assert len(rows) == len(range(s.rank, n, world)) + s.repeats     # its every world-th sample (+ one)
        if s.repeats:
            assert rows[-1] == rows[0]
    once = np.concatenate([rows[:-1] if s.repeats else rows for s, rows in zip(shards, seen)])
    assert sorted(once.tolist()) == list(range(n))
    assert sum(s.repeats for s in shards) == {(33, 8, 4): 3, (21, 5, 2): 1, (3, 1, 4): 1}.get((n, batch, world), 0)


def test_without_backmix_there_is_no_mixed_batch(tiny_root):
    b = next(iter(ReferenceLoader(ImageIndex.load(tiny_root), config(backmix=False))))
    assert b.mixed is None and b.images.shape == (8, 3, 32, 32)


def test_mixed_only_is_the_same_mixed_stream_without_the_clean_crops(tiny_root):
    index = ImageIndex.load(tiny_root)
    maps = ArrayMaps(np.random.default_rng(1).random((len(index), 8, 8), dtype=np.float32))
    both = list(ReferenceLoader(index, config(), maps))
    alone = list(ReferenceLoader(index, config(clean=False), maps))
    assert len(both) == len(alone) == 3
    for a, b in zip(alone, both):
        assert a.images is None and torch.equal(a.mixed, b.mixed) and torch.equal(a.canvas, b.canvas)
        assert torch.equal(a.indices, b.indices) and torch.equal(a.labels, b.labels)
    with pytest.raises(BackMixError, match="without BackMix must return the clean images"):
        config(backmix=False, clean=False)


def test_evaluation_mode_is_centre_crop_without_flip(tiny_root):
    index = ImageIndex.load(tiny_root)
    b = next(iter(ReferenceLoader(index, config(train=False, shuffle=False, backmix=False))))
    cfg = config()
    want = normalize(b.canvas[:, :, 4:36, 4:36], torch.tensor(cfg.mean), torch.tensor(cfg.std))
    assert torch.equal(b.images, want)


def test_a_broken_file_stops_with_its_path(folder_with_a_broken_file):
    loader = ReferenceLoader(ImageIndex.load(folder_with_a_broken_file), config(num_workers=1))
    with pytest.raises(DecodeError, match=r"broken/dog/000009.png does not decode"):
        list(loader)


def test_a_broken_file_is_skipped_and_counted(folder_with_a_broken_file):
    loader = ReferenceLoader(ImageIndex.load(folder_with_a_broken_file), config(on_error="skip"))
    seen = torch.cat([b.indices for b in loader])
    assert loader.skipped == 1 and len(seen) == 23 and 9 not in seen.tolist()


@pytest.mark.parametrize("kw, message", [(dict(box_fraction=0.0), r"--box-fraction \(box_fraction\) must lie in"),
                                         (dict(box_fraction=1.5), r"--box-fraction \(box_fraction\) must lie in"),
                                         (dict(top_k_ratio=1.0), r"--top-k-ratio \(top_k_ratio\) must lie in"),
                                         (dict(canvas=36), "multiple of the grid"),
                                         (dict(crop=48), "larger than the canvas")])
def test_bad_ratios_and_sizes_are_named(kw, message):
    with pytest.raises(BackMixError, match=message):
        config(**kw)


def test_a_new_map_generation_is_used_from_the_next_epoch(tiny_root):
    index = ImageIndex.load(tiny_root)

    class TwoGenerations(ArrayMaps):
        def refresh(self):
            self.maps = self.next_maps
            return True

    first = np.zeros((24, 8, 8), np.float32)
    first[:, :2, :] = 1.0                 # foreground: the top two rows
    maps = TwoGenerations(first)
    maps.next_maps = np.zeros_like(first)
    maps.next_maps[:, -2:, :] = 1.0       # foreground: the bottom two rows
    loader = ReferenceLoader(index, config(batch_size=24), maps)
    # refresh() runs as each epoch starts, so the swap is seen at once: the masks follow the new maps.
    b = next(iter(loader))
    p = BackMixSampler(canvas=40, crop=32, seed=0).draw(24, 0, 0).torch()
    new_masks = top_k_mask(torch.from_numpy(maps.next_maps), 0.25, p["tie_break"])
    assert new_masks[:, -2:, :].all() and not new_masks[:, :2, :].any()
    want = mix_backgrounds(b.canvas, p["partners"], new_masks, p["boxes"], (10, 10), fill_value(config().mean))
    cfg = config()
    assert torch.equal(b.mixed, normalize(crop_flip(want, p["crops"], p["flips"], 32),
                                          torch.tensor(cfg.mean), torch.tensor(cfg.std)))
