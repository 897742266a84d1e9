"""The data stage: bundled data, the index, splits, and clear errors for bad input."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from backmix.osr_data import BackMixError, ImageIndex, random_splits, resolve_split
from backmix.osr_data.prepare import DATASETS, prepare


def test_bundled_digits_are_all_written_in_imagenet_layout(digits_root):
    train, test = ImageIndex.load(digits_root / "train"), ImageIndex.load(digits_root / "test")
    assert len(train) + len(test) == 1797
    assert train.classes == test.classes == tuple(f"digit_{d}" for d in range(10))
    assert np.array_equal(np.bincount(train.labels) + np.bincount(test.labels),
                          [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])
    for i in (0, 500, len(train) - 1):
        assert train.paths[i].split("/")[0] == train.classes[train.labels[i]]
        assert (digits_root / "train" / train.paths[i]).is_file()


def test_index_file_is_fixed_order_and_matches_a_fresh_scan(digits_root):
    loaded = ImageIndex.load(digits_root / "train")
    scanned = ImageIndex.scan(digits_root / "train")
    assert loaded.paths == scanned.paths and np.array_equal(loaded.labels, scanned.labels)
    assert loaded.fingerprint() == scanned.fingerprint()
    assert list(loaded.paths) == sorted(loaded.paths)


def test_any_folder_in_the_layout_works(tiny_root):
    index = ImageIndex.load(tiny_root)
    assert index.classes == ("cat", "dog", "fox") and len(index) == 24
    assert (tiny_root / "index.csv").exists()


def test_prepare_again_is_a_no_op(digits_root):
    assert prepare("digits", digits_root) is False


def test_missing_and_empty_folders_are_named(tmp_path):
    with pytest.raises(BackMixError, match=f"{tmp_path / 'nope'} does not exist"):
        ImageIndex.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackMixError, match="is empty"):
        ImageIndex.load(tmp_path / "empty")


def test_a_failed_prepare_leaves_nothing_behind(tmp_path, monkeypatch):
    def half_then_fail(out, **_):
        (out / "train").mkdir(parents=True)
        (out / "train" / "x.png").write_bytes(b"123")
        raise RuntimeError("disk full")

    monkeypatch.setitem(DATASETS, "broken", half_then_fail)
    with pytest.raises(RuntimeError):
        prepare("broken", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_random_splits_follow_the_protocol_and_are_seeded():
    classes = tuple(f"c{i}" for i in range(10))
    splits = random_splits(classes, seed=0)
    assert len(splits) == 5
    for s in splits:
        assert len(s.known) == 6 and len(s.unknown) == 4 and set(s.known) | set(s.unknown) == set(classes)
    assert len({s.known for s in splits}) > 1
    assert [s.known for s in random_splits(classes, seed=0)] == [s.known for s in splits]
    assert resolve_split(classes, "2") == splits[2]


def test_explicit_split_and_label_map():
    classes = ("a", "b", "c", "d")
    s = resolve_split(classes, "d,b")
    assert s.known == ("b", "d") and s.unknown == ("a", "c")
    assert s.label_map(classes).tolist() == [-1, 0, -1, 1]


@pytest.mark.parametrize("spec, message", [("b,zebra", "class 'zebra', which does not exist"),
                                           ("7", "split 7 does not exist"),
                                           ("a,b,c,d", "not all")])
def test_bad_splits_are_named(spec, message):
    with pytest.raises(BackMixError, match=message):
        resolve_split(("a", "b", "c", "d"), spec)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "backmix", *args], capture_output=True, text=True)


def test_cli_error_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("not a data set")
    r = run_cli("data", "prepare", "--out", str(tmp_path / "junk"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"backmix: error: {tmp_path / 'junk'} exists and is not a prepared data set; pass --force to replace it"]
    assert "Traceback" not in r.stderr


def test_every_subcommand_has_help():
    r = run_cli("--help")
    assert r.returncode == 0 and "data" in r.stdout
    r = run_cli("data", "prepare", "--help")
    assert r.returncode == 0 and "--out" in r.stdout


# --- digits-on-photos: the data set with a fore-background prior ---------------------------------

@pytest.fixture(scope="module")
def on_photos():
    from backmix.osr_data.composite import digits_on_photos
    return digits_on_photos(prior=0.8, seed=0)


def test_on_photos_training_backgrounds_follow_the_prior(on_photos):
    d = on_photos
    own = d["train_photos"] == d["class_photo"][d["train_labels"]]
    n = len(own)
    # Binomial(n, 0.8): 5 standard deviations either side.
    assert abs(own.mean() - 0.8) < 5 * np.sqrt(0.8 * 0.2 / n)
    assert len(set(d["class_photo"].tolist())) == 10   # every class has a photograph of its own


def test_on_photos_test_backgrounds_are_uniform(on_photos):
    from backmix.osr_data.composite import bundled_photos
    d = on_photos
    n_photos = len(bundled_photos())
    counts = np.bincount(d["test_photos"], minlength=n_photos)
    expected = len(d["test_photos"]) / n_photos
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 45.0    # chi-square, 15 dof: p < 1e-4 beyond this
    own = d["test_photos"] == d["class_photo"][d["test_labels"]]
    assert own.mean() < 0.2


def test_on_photos_same_digits_split_as_digits(on_photos):
    from backmix.osr_data.prepare import digits_arrays
    _, ytr, _, yte, _ = digits_arrays()
    assert np.array_equal(on_photos["train_labels"], ytr) and np.array_equal(on_photos["test_labels"], yte)
    assert on_photos["train_images"].shape == (len(ytr), 32, 32, 3)
    assert on_photos["train_images"].dtype == np.uint8


def test_on_photos_rejects_a_prior_outside_0_1(tmp_path):
    from backmix.osr_data.composite import digits_on_photos
    with pytest.raises(BackMixError, match="prior"):
        digits_on_photos(prior=1.5)
