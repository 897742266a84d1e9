"""The validation split: per-class, disjoint from the training and test rows, deterministic per seed."""
from __future__ import annotations

import numpy as np
import pytest

from backmix import open_set_data
from backmix.osr_data.errors import BackMixError
from backmix.osr_data.holdout import split_validation, validation_count
from backmix.osr_data.open_set import load_data


def test_validation_rows_are_a_per_class_share_disjoint_from_training_and_test(digits_root):
    data = open_set_data(digits_root, "0", val_fraction=0.1, seed=0)
    everything = load_data(digits_root, "0")                      # no validation: every known row trains
    train, val = set(data.known_rows.tolist()), set(data.val_rows.tolist())
    assert train.isdisjoint(val) and train | val == set(everything.known_rows.tolist())
    labels = data.train.labels
    for label in data.split.known_labels(data.train.classes):
        n = int((labels[everything.known_rows] == label).sum())
        assert int((labels[data.val_rows] == label).sum()) == round(0.1 * n)
    # only known classes are held out, and no validation image is a test image
    assert (data.label_map[labels[data.val_rows]] >= 0).all()
    test_paths = {data.test.abspath(i) for i in range(len(data.test))}
    assert test_paths.isdisjoint({data.train.abspath(i) for i in data.val_rows})


def test_validation_rows_are_deterministic_per_seed_and_per_class(digits_root):
    a = open_set_data(digits_root, "0", val_fraction=0.1, seed=0)
    assert np.array_equal(a.val_rows, open_set_data(digits_root, "0", val_fraction=0.1, seed=0).val_rows)
    assert np.array_equal(a.val_rows, load_data(digits_root, "0", 0.1, 0).val_rows)   # the trainer's call
    other = open_set_data(digits_root, "0", val_fraction=0.1, seed=1)
    assert not np.array_equal(a.val_rows, other.val_rows) and len(a.val_rows) == len(other.val_rows)
    # a class shared by two splits keeps the same validation images
    b = open_set_data(digits_root, "1", val_fraction=0.1, seed=0)
    labels = a.train.labels
    for label in set(a.split.known_labels(a.train.classes)) & set(b.split.known_labels(b.train.classes)):
        assert np.array_equal(a.val_rows[labels[a.val_rows] == label], b.val_rows[labels[b.val_rows] == label])


def test_the_library_serves_the_validation_rows_as_an_evaluation_loader(digits_root):
    import backmix
    data = open_set_data(digits_root, "0", val_fraction=0.1, seed=0)
    val = backmix.loader(data, train=False, validation=True, batch_size=64, num_workers=0)
    served = np.concatenate([b.indices.numpy() for b in val])
    assert served.tolist() == data.val_rows.tolist()          # in order, each once, no BackMix
    assert all((b.labels >= 0).all() for b in val)


def test_validation_count_keeps_a_training_image_and_refuses_bad_fractions():
    assert [validation_count(n, 0.1) for n in (1, 2, 4, 15, 126)] == [0, 1, 1, 2, 13]
    assert validation_count(10, 0.0) == 0 and validation_count(3, 0.9) == 2
    rows, val = split_validation(np.array([0, 0, 1, 1]), np.arange(4), 0.0, 0)
    assert rows.tolist() == [0, 1, 2, 3] and val.size == 0
    with pytest.raises(BackMixError, match=r"--val-fraction must lie in \[0, 1\), got 1.0"):
        split_validation(np.array([0, 0]), np.arange(2), 1.0, 0)


def test_each_class_s_rows_are_drawn_from_in_ascending_order_whatever_the_label_order():
    # The rule the validation rows follow, written out per class: the class's rows ascending, permuted by
    # the generator of (seed, label), the first validation_count of them held out.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 500)                   # unsorted, as a hand-written index may have them
    rows = rng.choice(500, 300, replace=False)          # any subset, in any order
    for seed in (0, 3):
        held = []
        for label in np.unique(labels[rows]):
            mine = np.sort(rows)[labels[np.sort(rows)] == label]
            perm = np.random.default_rng([seed, int(label)]).permutation(mine.size)
            held.append(mine[perm[:validation_count(mine.size, 0.25)]])
        train, val = split_validation(labels, rows, 0.25, seed)
        assert val.tolist() == np.sort(np.concatenate(held)).tolist()
        assert train.tolist() == sorted(set(rows.tolist()) - set(val.tolist()))
