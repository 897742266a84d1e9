"""The Semantic Shift Benchmark's protocols (--protocol ssb-*) and their shipped lists."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from backmix import open_set_data
from backmix.cli import main as cli_main
from backmix.osr_data.errors import BackMixError
from backmix.osr_data.prepare import write_split
from backmix.osr_data.protocols import protocol
from backmix.osr_data.ssb import ssb_class_names
from backmix.trainers.open_test import open_test_indexes

# (known, easy, medium, hard, every class) as sgvaze/SSB's splits/*_ssb_splits.json publish them
SIZES = {"ssb-imagenet": (1000, 1000, None, 980, None), "ssb-cub": (100, 32, 34, 34, 200),
         "ssb-aircraft": (50, 20, 17, 13, 100), "ssb-scars": (98, 76, 15, 7, 196)}


def test_the_shipped_ssb_lists_have_the_published_sizes_and_no_class_both_known_and_unknown():
    for name, (known, easy, medium, hard, every) in SIZES.items():
        p = protocol(name)
        assert len(p.entries) == 1 and p.every_known and p.classes == p.entries[0][0]
        assert len(p.classes) == len(set(p.classes)) == known
        sets = p.open_sets
        assert len(sets["easy"]) == easy and len(sets["hard"]) == hard
        unknown = sets["easy"] + sets["hard"] + sets.get("medium", ())
        assert len(unknown) == len(set(unknown)) and not set(unknown) & set(p.classes)
        if medium is None:
            assert set(sets) == {"easy", "hard"}
        else:   # the fine-grained sets split the data set's classes: the folders are its 3-digit indices
            assert len(sets["medium"]) == medium and sets["medium+hard"] == sets["medium"] + sets["hard"]
            assert sorted(p.classes + unknown) == [f"{i:03d}" for i in range(every)]
            assert len(ssb_class_names(name)) == every
    imagenet = protocol("ssb-imagenet")
    assert imagenet.classes == tuple(sorted(imagenet.classes)) and imagenet.classes[:2] == ("n01440764", "n01443537")
    assert imagenet.classes[-1] == "n15075141" and all(len(c) == 9 and c[0] == "n" for c in imagenet.classes)
    assert imagenet.open_sets["easy"][:2] == ("n00021939", "n00015388")
    assert imagenet.open_sets["hard"][:2] == ("n01848648", "n01849466")
    cub = protocol("ssb-cub")
    assert cub.classes[:3] == ("150", "070", "034") and cub.open_sets["easy"][:2] == ("020", "159")
    assert ssb_class_names("ssb-cub")["000"] == "Black_footed_Albatross"
    assert ssb_class_names("ssb-aircraft")["000"] == "Boeing 707 707-320"
    assert ssb_class_names("ssb-imagenet") == {}


def _folder(root, classes, per_class=1, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(classes)), per_class)
    write_split(root, rng.integers(0, 256, (len(labels), 8, 8, 3), dtype=np.uint8), labels, tuple(classes))
    return root


@pytest.fixture(scope="module")
def fake_ssb(tmp_path_factory):
    """An ImageNet-like root (the 1,000 wnid folders of train/ and test/, one 8x8 PNG each) and the Easy and
    Hard folders of the benchmark (one image a class)."""
    base = tmp_path_factory.mktemp("ssb")
    p = protocol("ssb-imagenet")
    for split, seed in (("train", 0), ("test", 1)):
        _folder(base / "imagenet" / split, p.classes, seed=seed)
    _folder(base / "ssb" / "easy", p.open_sets["easy"], seed=2)
    _folder(base / "ssb" / "hard", p.open_sets["hard"], seed=3)
    return base


def _train(base, out, *extra):
    return ["-q", "train", "--data", str(base / "imagenet"), "--out", str(out), "--protocol", "ssb-imagenet",
            "--epochs", "1", "--width", "0.25", "--batch-size", "128", "--no-backmix", "--val-fraction", "0",
            "--device", "cpu", "--workers", "0", "--no-progress", *extra]


def test_ssb_imagenet_trains_on_every_wnid_and_scores_the_easy_and_hard_folders(fake_ssb, tmp_path, capsys):
    import torch
    out = tmp_path / "run"
    assert cli_main(_train(fake_ssb, out, "--open-test", str(fake_ssb / "ssb" / "easy"),
                           "--open-test", str(fake_ssb / "ssb" / "hard"))) == 0
    assert json.loads((out / "config.json").read_text())["split"] == "all"
    assert torch.load(out / "last.pt", weights_only=False)["known_classes"] == list(protocol("ssb-imagenet").classes)
    sets = json.loads((out / "summary.json").read_text())["last"]["test"]["open_test"]
    assert {name: m["num_unknown"] for name, m in sets.items()} == {"easy": 1000, "hard": 980}
    assert all(0 <= m["auroc_msp"] <= 1 for m in sets.values())
    # backmix eval checks the folders against the run's protocol too
    wrong = _folder(tmp_path / "other" / "hard", ("n01440764", "n01443537"))
    capsys.readouterr()
    assert cli_main(["eval", "--checkpoint", str(out / "last.pt"), "--data", str(fake_ssb / "imagenet"),
                     "--device", "cpu", "--workers", "0", "--open-test", str(wrong)]) == 2
    assert capsys.readouterr().err == (f"backmix: error: --open-test {wrong} does not hold the hard unknowns of "
                                       "--protocol ssb-imagenet: missing 'n01848648', 'n01849466', 'n01857325', "
                                       "'n01856890' and 976 more; not in it 'n01440764', 'n01443537'\n")


def test_a_folder_that_is_not_the_published_set_is_one_line_before_the_run_folder(fake_ssb, digits_root,
                                                                                  tmp_path, capsys):
    # the Easy set less one class, and one class of the Hard set instead: a folder named easy of other classes
    easy = tmp_path / "mine" / "easy"
    shutil.copytree(fake_ssb / "ssb" / "easy", easy, ignore=shutil.ignore_patterns("n00015388", "index*"))
    shutil.copytree(fake_ssb / "ssb" / "hard" / "n01848648", easy / "n01848648")
    out = tmp_path / "run"
    assert cli_main(_train(fake_ssb, out, "--open-test", str(easy))) == 2
    assert capsys.readouterr().err == (f"backmix: error: --open-test {easy} does not hold the easy unknowns of "
                                       "--protocol ssb-imagenet: missing 'n00015388'; not in it 'n01848648'\n")
    assert not out.exists()
    # a training folder without the 1,000 ImageNet-1k wnids, and a split other than every class
    assert cli_main(["train", "--data", str(digits_root), "--out", str(out), "--protocol", "ssb-imagenet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("backmix: error: the folder's classes do not match --protocol ssb-imagenet split all: "
                          "missing 'n01440764', 'n01443537', 'n01484850', 'n01491361' and 996 more; not in it "
                          "'digit_0'") and err.count("\n") == 1
    assert cli_main(_train(fake_ssb, out, "--split", "2")) == 2
    assert capsys.readouterr().err == ("backmix: error: --protocol ssb-imagenet trains on every known class, with "
                                       "the unknowns from its --open-test folders: --split all, not '2'\n")
    assert not out.exists()


def test_the_fine_grained_protocols_take_index_folders_and_check_each_difficulty(tmp_path):
    cub = protocol("ssb-cub")
    root = tmp_path / "cub"
    for split in ("train", "test"):
        _folder(root / split, sorted(cub.classes))
    data = open_set_data(root, "all", protocol="ssb-cub")
    assert data.split.known == tuple(sorted(cub.classes)) and data.split.unknown == ()
    assert open_set_data(root, 0, protocol="ssb-cub").split == data.split   # its one split
    sets = {name: _folder(tmp_path / "ssb" / folder, cub.open_sets[name])
            for name, folder in (("easy", "Easy"), ("medium+hard", "medium+hard"))}   # any case
    assert list(open_test_indexes([str(f) for f in sets.values()], published=cub)) == ["Easy", "medium+hard"]
    with pytest.raises(BackMixError, match="does not hold the medium unknowns of --protocol ssb-cub: missing"):
        open_test_indexes([str(_folder(tmp_path / "other" / "Medium" / "test", cub.open_sets["hard"]))],
                          published=cub)   # DIR/test: DIR's name counts
    hard = tmp_path / "other" / "hard"
    shutil.copytree(sets["medium+hard"], hard)   # the merged classes under the name of the Hard set alone
    shown = ", ".join(repr(c) for c in sorted(cub.open_sets["medium"])[:4])   # the folder's (sorted) order
    with pytest.raises(BackMixError, match=f"does not hold the hard unknowns of --protocol ssb-cub: not in it "
                                           f"{shown} and 30 more$"):
        open_test_indexes([str(hard)], published=cub)
    with pytest.raises(BackMixError, match="--split all, not '1'"):
        open_set_data(root, 1, protocol="ssb-cub")

