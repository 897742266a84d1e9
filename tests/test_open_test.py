"""The bundled set of unknowns (photo-crops) and --open-test folder names."""
from __future__ import annotations

import numpy as np
import pytest

from backmix.osr_data.errors import BackMixError
from backmix.osr_data.index import ImageIndex
from backmix.osr_data.photo_crops import photo_crops, photo_names
from backmix.osr_data.prepare import prepare
from backmix.trainers.open_test import open_test_indexes, open_test_name


def test_photo_crops_prepare_offline_as_an_image_folder(tmp_path):
    assert prepare("photo-crops", tmp_path / "pc")
    test = ImageIndex.load(tmp_path / "pc" / "test")
    assert len(test) == 16 * 12 and test.classes == tuple(sorted(photo_names()))
    a, labels = photo_crops(seed=0)
    b, _ = photo_crops(seed=0)
    assert np.array_equal(a, b) and a.shape == (192, 32, 32, 3) and np.bincount(labels).tolist() == [12] * 16
    # no digit on them: dimmed as digits-on-photos dims its backgrounds, so nothing reaches white
    assert a.max() <= round(255 * 0.75)
    assert open_test_name(tmp_path / "pc" / "test") == "pc/test" and open_test_name(tmp_path / "pc") == "pc"
    assert list(open_test_indexes([str(tmp_path / "pc" / "test")])) == ["pc/test"]
    with pytest.raises(BackMixError, match="two --open-test folders are both named 'pc/test'"):
        open_test_indexes([str(tmp_path / "pc" / "test")] * 2)


def _train_words(root, out, open_test: str) -> list[str]:
    return ["train", "--data", str(root), "--out", str(out), "--epochs", "1", "--width", "0.25", "--batch-size",
            "16", "--known", "ant,cat", "--workers", "0", "--device", "cpu", "--no-progress", "--open-test",
            open_test]


@pytest.mark.parametrize("folder, says", [
    ("test", "is the data's own folder"), ("train", "is the data's own folder"),
    ("train/ant", "lies inside the data's own folder"), ("copy", "holds the very images of"),
    ("", "--open-test: empty path"), ("nope", "is not a folder of images")])
def test_an_open_test_folder_of_the_data_itself_is_refused_before_the_run_folder_is_made(
        small_root, tmp_path, capsys, folder, says):
    import shutil

    from backmix.cli import main as cli_main
    shutil.copytree(small_root / "test", tmp_path / "copy", copy_function=shutil.copy2)   # same sizes, mtimes
    given = str(tmp_path / folder) if folder in ("copy", "nope") else str(small_root / folder) if folder else ""
    assert cli_main(_train_words(small_root, tmp_path / "run", given)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert says in err[-1] and err[-1].startswith("backmix: error: ")
    assert not (tmp_path / "run").exists()     # no config, log, cache or lock left behind



def test_an_open_test_folder_without_its_beton_is_named_before_any_work_under_ffcv(small_root, tmp_path, capsys):
    """--backend ffcv: the train and test betons exist, the --open-test folder's does not: one line naming that
    folder and the command that writes its beton, before the run folder is made."""
    import shutil

    from backmix.cli import main as cli_main
    root = tmp_path / "data"
    shutil.copytree(small_root, root)
    assert cli_main(["data", "write-beton", "--data", str(root), "--canvas", "40"]) == 0
    shutil.copytree(small_root / "test" / "bee", tmp_path / "others" / "bee")
    words = _train_words(root, tmp_path / "run", str(tmp_path / "others")) + ["--backend", "ffcv"]
    capsys.readouterr()
    assert cli_main(words) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("backmix: error: --backend ffcv reads betons written once, and " + str(tmp_path / "others"))
    assert "write them with `backmix data write-beton" in err and not (tmp_path / "run").exists()


def test_split_all_knows_every_class_and_scores_only_the_open_test_folders(small_root, tmp_path, capsys, caplog):
    """--split all: every class of the folder is known; without --open-test a closed-set run that says so and
    reports accuracy only; with one, its metrics lead the epoch line, summary.json and the closing line (no
    AUROC of an empty held-out set anywhere)."""
    import json
    import logging
    import shutil

    import backmix
    from backmix.cli import main as cli_main
    data = backmix.open_set_data(small_root, split="all")
    assert data.num_known == 4 and data.split.unknown == () and (data.label_map >= 0).all()

    def words(out, *extra):
        return ["train", "--data", str(small_root), "--out", str(out), "--epochs", "1", "--width", "0.25",
                "--batch-size", "16", "--split", "all", "--workers", "0", "--device", "cpu", "--no-progress",
                "--log", "csv", *extra]

    caplog.set_level(logging.INFO, logger="backmix")
    assert cli_main(words(tmp_path / "closed")) == 0
    assert "a closed-set run, reporting accuracy only" in caplog.text
    last = json.loads((tmp_path / "closed" / "summary.json").read_text())["last"]["test"]
    assert set(last) == {"accuracy", "num_known", "num_unknown"} and last["num_unknown"] == 0
    caplog.clear()
    capsys.readouterr()

    shutil.copytree(small_root / "test" / "bee", tmp_path / "others" / "bee")
    assert cli_main(words(tmp_path / "open", "--open-test", str(tmp_path / "others"))) == 0
    assert "closed-set run" not in caplog.text and "vs others: AUROC" in caplog.text
    summary = json.loads((tmp_path / "open" / "summary.json").read_text())["last"]["test"]
    assert "auroc_msp" not in summary and summary["open_test"]["others"]["num_unknown"] == 6
    closing = capsys.readouterr().out.strip().splitlines()[-1]
    assert "vs others: AUROC (MSP)" in closing and "test accuracy" in closing
    assert closing.count("AUROC") == 2      # last.pt's and best.pt's, both against the open-test folder
