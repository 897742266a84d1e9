"""Published split lists: --protocol (shipped as class names) and --splits FILE."""
from __future__ import annotations

import json

import numpy as np
import pytest

from backmix import open_set_data
from backmix.cli import main as cli_main
from backmix.osr_data.errors import BackMixError
from backmix.osr_data.split_folder import write_split
from backmix.osr_data.protocols import load_splits_file, protocol

CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# ARPL's split.py, splits_2020["cifar10"]: the known classes of each split as CIFAR10 label indices
ARPL_CIFAR10 = [[0, 6, 4, 9, 1, 7], [7, 6, 4, 9, 0, 1], [1, 5, 7, 3, 9, 4], [8, 6, 1, 9, 0, 7], [2, 4, 1, 7, 9, 6]]


def image_folder(root, names, per_class=2):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(len(names)), per_class)
    for split in ("train", "test"):
        write_split(root / split, rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8), labels, names)
    return root


@pytest.fixture(scope="module")
def cifar_names_root(tmp_path_factory):
    """A tiny folder whose classes carry the CIFAR10 names (3 train and 3 test images a class)."""
    return image_folder(tmp_path_factory.mktemp("cifar10"), CIFAR10, per_class=3)


def test_protocol_cifar10_yields_the_published_known_sets(cifar_names_root):
    for k, labels in enumerate(ARPL_CIFAR10):
        data = open_set_data(cifar_names_root, k, protocol="cifar10")
        assert set(data.split.known) == {CIFAR10[i] for i in labels}
        assert set(data.split.unknown) == set(CIFAR10) - {CIFAR10[i] for i in labels}
        assert data.split.known == tuple(c for c in CIFAR10 if c in data.split.known)   # the folder's label order


def test_the_shipped_lists_of_cifar_plus_10_and_tinyimagenet_are_well_formed():
    plus = protocol("cifar+10")
    assert len(plus.entries) == 5 and plus.classes is None
    for known, unknown in plus.entries:
        assert len(known) == 4 and set(known) <= set(CIFAR10) and len(unknown) == 10 and not set(unknown) & set(CIFAR10)
    tiny = protocol("tinyimagenet")
    assert len(tiny.classes) == 200 and list(tiny.classes) == sorted(tiny.classes)
    assert all(len(known) == 20 and set(known) <= set(tiny.classes) and unknown is None
               for known, unknown in tiny.entries)


def test_cifar_plus_50_is_arpls_list_written_as_names():
    plus50, plus10 = protocol("cifar+50"), protocol("cifar+10")
    assert len(plus50.entries) == 5 and plus50.classes is None
    for (known, unknown), (known10, unknown10) in zip(plus50.entries, plus10.entries):
        assert known == known10 and set(known) <= set(CIFAR10) and len(unknown) == len(set(unknown)) == 50
        assert not set(unknown) & set(CIFAR10) and unknown[-10:] == unknown10   # ARPL's +50 lists end in the +10 ones
    # ARPL split.py, splits_2020["cifar100-50"][0][:5] = [27, 94, 29, 77, 88] in CIFAR100's fine-label order
    assert plus50.entries[0][1][:5] == ("crocodile", "wardrobe", "dinosaur", "snail", "tiger")
    assert plus50.entries[4][0] == ("automobile", "airplane", "truck", "ship")


def test_a_folder_whose_classes_do_not_match_the_protocol_is_one_line(digits_root, cifar_names_root, tmp_path, capsys):
    args = ["train", "--data", str(digits_root), "--out", str(tmp_path / "run"), "--protocol", "cifar10",
            "--split", "2", "--device", "cpu", "--workers", "0"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert err == ("backmix: error: the folder's classes do not match --protocol cifar10 split 2: missing "
                   "'airplane', 'automobile', 'bird', 'cat' and 6 more; not in it 'digit_0', 'digit_1', "
                   "'digit_2', 'digit_3' and 6 more\n")
    with pytest.raises(BackMixError, match="with --protocol cifar10, --split is a split number 0..4, not '5'"):
        open_set_data(cifar_names_root, 5, protocol="cifar10")
    with pytest.raises(BackMixError, match="missing 'dolphin', 'couch'"):
        open_set_data(cifar_names_root, 0, protocol="cifar+10")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_split_all_under_a_protocol_checks_the_folder_too(digits_root):
    with pytest.raises(BackMixError, match="do not match --protocol cifar10 split all: missing 'airplane'"):
        open_set_data(digits_root, "all", protocol="cifar10")


def test_splits_file_picks_the_known_classes_and_refuses_bad_files(tmp_path, capsys):
    root = image_folder(tmp_path / "data", ("ant", "bee", "cat", "dog"))
    good = tmp_path / "splits.json"
    good.write_text(json.dumps([["ant", "cat"], {"known": ["bee", "dog"], "unknown": ["ant", "cat"]}]))
    assert open_set_data(root, 0, splits_file=str(good)).split.known == ("ant", "cat")
    assert open_set_data(root, 1, splits_file=str(good)).split.unknown == ("ant", "cat")
    for text, message in (("not json", "cannot read --splits"), ("{}", "must hold a JSON list of splits"),
                          ('[["ant", "ant"]]', "split 0 must be a list of distinct class names"),
                          ('[{"known": ["ant"], "unknown": ["ant"]}]', "names 'ant' known and unknown")):
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(BackMixError, match=message):
            load_splits_file(tmp_path / "bad.json")
    (tmp_path / "partial.json").write_text('[{"known": ["ant", "bee"], "unknown": ["cat"]}]')
    with pytest.raises(BackMixError, match="do not match --splits .* split 0: not in it 'dog'"):
        open_set_data(root, 0, splits_file=str(tmp_path / "partial.json"))
    args = ["train", "--data", str(root), "--out", str(tmp_path / "run"), "--splits", str(good), "--protocol",
            "cifar10"]
    assert cli_main(args) == 2
    assert capsys.readouterr().err == "backmix: error: --protocol and --splits both name the split list; give one of them\n"


def test_training_with_a_protocol_records_the_published_known_classes(cifar_names_root, tmp_path):
    import torch
    out = tmp_path / "run"
    assert cli_main(["-q", "train", "--data", str(cifar_names_root), "--out", str(out), "--protocol", "cifar10",
                     "--split", "3", "--epochs", "1", "--width", "0.25", "--batch-size", "8", "--no-backmix",
                     "--device", "cpu", "--workers", "0", "--no-progress"]) == 0
    ckpt = torch.load(out / "last.pt", weights_only=False)
    assert set(ckpt["known_classes"]) == {CIFAR10[i] for i in ARPL_CIFAR10[3]}
    assert json.loads((out / "config.json").read_text())["protocol"] == "cifar10"
