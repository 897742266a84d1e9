"""Issue 20's failures of a hostile-user probe, one test per class: each is one line `backmix: error: ...`
(exit 2) or the right behaviour, and nothing is left behind."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import backmix
from backmix.cli import main as cli_main
from backmix.osr_data.errors import BackMixError
from backmix.osr_data.index import ImageIndex, atomic_write_bytes
from backmix.trainers.config import TrainConfig

from helpers import random_image_root

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("ant", "bee", "cat", "dog")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """root/train (6 a class) and root/test (3 a class), 4 classes of random 32x32 images."""
    return random_image_root(tmp_path_factory.mktemp("hostile"), CLASSES, 6, 3)


def one_line(capsys, *parts: str) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("backmix: error: "), err
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


def train_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(root), "--out", str(out), "--epochs", "1", "--width", "0.25", "--batch-size", "4",
            "--known", "ant,cat", "--workers", "0", "--device", "cpu", "--no-progress", "--no-backmix", *extra]


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# --------------------------------------------------------------------------- a full disk

def test_a_full_disk_during_prepare_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Image.Image, "save", no_space)
    assert cli_main(["data", "prepare", "--out", str(tmp_path / "digits")]) == 2
    one_line(capsys, "no space left on the device writing", str(tmp_path / "digits"))
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_during_cache_build_is_one_line_and_leaves_no_pending_folder(root, tmp_path, capsys,
                                                                                   monkeypatch):
    from backmix.cam_cache import precompute
    from backmix.models import build_model, save_checkpoint
    save_checkpoint(tmp_path / "m.pt", build_model("cnn32", 2, width=0.25), arch="cnn32", num_classes=2,
                    model_kwargs={"width": 0.25}, known_classes=["ant", "cat"])
    cache = tmp_path / "cache"
    assert cli_main(["cache", "init", "--data", str(root / "train"), "--cache", str(cache)]) == 0
    before = sorted(p.name for p in cache.iterdir())
    capsys.readouterr()
    monkeypatch.setattr(precompute, "write_maps", no_space)
    assert cli_main(["cache", "build", "--checkpoint", str(tmp_path / "m.pt"), "--data", str(root / "train"),
                     "--cache", str(cache), "--device", "cpu", "--workers", "0", "--no-progress"]) == 2
    one_line(capsys, "no space left on the device writing", str(cache / "next-000001"))
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == before


def test_a_full_disk_during_write_beton_is_one_line_without_a_worker_traceback(root, tmp_path, capsys,
                                                                              monkeypatch):
    pytest.importorskip("ffcv", reason="write-beton needs FFCV")
    from ffcv import memory_allocator
    # FFCV's worker processes (forked, so patched too) fail as on a full disk; its writer would wait forever
    monkeypatch.setattr(memory_allocator.MemoryAllocator, "flush_page", no_space)
    out = tmp_path / "x.beton"
    assert cli_main(["data", "write-beton", "--data", str(root / "train"), "--out", str(out), "--workers", "1",
                     "--no-progress"]) == 2
    one_line(capsys, "no space left on the device writing")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- folders and index rows

def test_a_dangling_symlink_in_a_class_folder_is_named(root, tmp_path, capsys):
    data = shutil.copytree(root / "train", tmp_path / "train", ignore=shutil.ignore_patterns("index.csv"))
    os.symlink(tmp_path / "gone.png", data / "bee" / "link.png")
    assert cli_main(["cache", "init", "--data", str(data), "--cache", str(tmp_path / "c")]) == 2
    one_line(capsys, f"{data / 'bee' / 'link.png'} is a symbolic link to", "which does not exist")


@pytest.mark.parametrize("row", ["../../outside/000.png", "/etc/hostname", "ant/../../x.png"])
def test_an_index_row_outside_the_data_folder_says_so(root, tmp_path, capsys, row):
    data = shutil.copytree(root / "train", tmp_path / "train")
    text = (data / "index.csv").read_text().splitlines()
    text[1] = row + "," + text[1].split(",", 1)[1]
    (data / "index.csv").write_text("\n".join(text) + "\n")
    assert cli_main(["cache", "init", "--data", str(data), "--cache", str(tmp_path / "c")]) == 2
    one_line(capsys, f"line 2: path {row!r} is outside the data folder")


# --------------------------------------------------------------------------- runs, prepare, write-beton

def test_a_second_train_into_a_held_run_folder_is_refused_and_the_lock_dies_with_its_holder(root, tmp_path,
                                                                                           capsys):
    from backmix.trainers.run_lock import hold_run_folder
    run = tmp_path / "run"
    run.mkdir()
    with hold_run_folder(run):
        assert cli_main(train_args(root, run)) == 2
        one_line(capsys, f"another backmix train is running in {run}")
    assert not (run / "config.json").exists()
    # a holder killed with -9 releases it: the kernel drops a dead process's flock
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from backmix.trainers.run_lock import hold_run_folder\n"
                               f"with hold_run_folder(Path({str(run)!r})):\n print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    assert cli_main(train_args(root, run)) == 2
    one_line(capsys, "another backmix train is running")
    holder.kill()
    holder.wait()
    done = subprocess.run([sys.executable, "-m", "backmix", *train_args(root, run)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("mixing on cpu") == 1, done.stderr   # the train and eval loaders announce it once


def test_resume_after_a_kill_before_the_first_checkpoint_says_to_rerun(root, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    cfg = TrainConfig(data=str(root), out=str(run), split="ant,cat", device="cpu")
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    assert cli_main(train_args(root, run, "--resume")) == 2
    one_line(capsys, f"the run in {run} stopped before its first checkpoint", "rerun it without --resume")


def test_the_next_writer_removes_temporaries_of_dead_writers_only(tmp_path):
    dead, alive = tmp_path / f".x.beton.tmp-{dead_pid()}", tmp_path / f".x.beton.tmp-{os.getppid()}"
    dead.write_bytes(b"half a beton")
    alive.write_bytes(b"a live writer's")
    atomic_write_bytes(tmp_path / "x.beton", b"done")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, "x.beton"])


def test_write_beton_removes_a_killed_writers_temporary(root, tmp_path, capsys):
    pytest.importorskip("ffcv", reason="write-beton needs FFCV")
    left = tmp_path / f".x.beton.tmp-{dead_pid()}"
    left.write_bytes(b"half a beton")
    assert cli_main(["data", "write-beton", "--data", str(root / "train"), "--out", str(tmp_path / "x.beton"),
                     "--workers", "1", "--no-progress"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.beton"]


def test_prepare_over_another_data_set_says_so(tmp_path, capsys):
    out = tmp_path / "digits"
    assert cli_main(["data", "prepare", "--out", str(out), "--seed", "1"]) == 0
    assert json.loads((out / "prepared.json").read_text()) == {"dataset": "digits", "seed": 1}
    capsys.readouterr()
    assert cli_main(["data", "prepare", "--out", str(out), "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith(f"already prepared: {out}")
    assert cli_main(["data", "prepare", "--out", str(out), "--seed", "2"]) == 2
    one_line(capsys, f"{out} holds another data set (dataset digits, seed 1), not dataset digits, seed 2")
    assert cli_main(["data", "prepare", "--out", str(out), "--dataset", "digits-on-photos"]) == 2
    one_line(capsys, "not dataset digits-on-photos, prior 0.5, seed 0")


def test_eval_on_another_split_than_the_checkpoints_is_refused(root, tmp_path, capsys):
    from backmix.models import build_model, save_checkpoint
    ckpt = save_checkpoint(tmp_path / "m.pt", build_model("cnn32", 2, width=0.25), arch="cnn32", num_classes=2,
                           model_kwargs={"width": 0.25}, known_classes=["ant", "cat"])
    assert cli_main(["eval", "--checkpoint", str(ckpt), "--data", str(root), "--split", "bee,dog",
                     "--device", "cpu", "--workers", "0"]) == 2
    one_line(capsys, f"checkpoint {ckpt} was trained on known classes ant, cat, not split bee,dog (bee, dog)")


# --------------------------------------------------------------------------- the library

@pytest.fixture(scope="module")
def lib(root):
    data = backmix.open_set_data(root, "ant,cat")
    return data, backmix.loader(data, train=False, num_workers=0, device="cpu")


@pytest.mark.parametrize("call, error, says", [
    (lambda d, t: backmix.evaluate("model", t, d), TypeError, "model must be a torch.nn.Module, not str"),
    (lambda d, t: backmix.evaluate(__import__("backmix.models", fromlist=["x"]).build_model("cnn32", 3), t, d),
     BackMixError, "model has 3 outputs, but the split has 2 known classes"),
    (lambda d, t: backmix.evaluate(__import__("backmix.models", fromlist=["x"]).build_model("cnn32", 2),
                                   backmix.loader(backmix.open_set_data(d.train.root.parent, "bee,dog"),
                                                  train=False, num_workers=0, device="cpu"), d),
     BackMixError, "test_loader was made for another split than data"),
    (lambda d, t: backmix.evaluate(__import__("backmix.models", fromlist=["x"]).build_model("cnn32", 2), "loader", d),
     TypeError, "test_loader must be a backmix evaluation loader"),
    (lambda d, t: t.set_epoch(-1), BackMixError, "set_epoch: epoch must be a whole number >= 0, got -1"),
    (lambda d, t: backmix.loader(d, seed=2**63), BackMixError, "--seed (seed) must be a whole number in [0, 2**63)"),
    (lambda d, t: backmix.loader(d, seed=-1), BackMixError, "--seed (seed) must be a whole number in [0, 2**63)"),
    (lambda d, t: backmix.loader(d, std=(0.2, 0.0, 0.2)), BackMixError, "std must be 3 finite numbers"),
    (lambda d, t: backmix.open_set_data(d.train.root.parent, ["ant", "cat"]), TypeError, "split must be"),
    (lambda d, t: backmix.open_set_data(42), TypeError, "root must be a folder path"),
], ids=["model-not-a-classifier", "model-class-count", "loader-of-another-split", "loader-not-a-loader",
        "set-epoch-negative", "seed-too-large", "seed-negative", "std-zero", "split-a-list", "root-a-number"])
def test_library_calls_are_checked_like_the_command_line(lib, call, error, says):
    data, test_loader = lib
    with pytest.raises(error) as e:
        call(data, test_loader)
    assert says in str(e.value)


def test_an_empty_evaluation_loader_is_refused(lib):
    from backmix.arguments import check_eval_loader
    data, test_loader = lib

    class Empty:
        index, row_labels = test_loader.index, test_loader.row_labels

        def __len__(self):
            return 0
    with pytest.raises(BackMixError, match="test_loader yields no batches"):
        check_eval_loader(Empty(), data)


def test_rebuild_refuses_a_model_of_another_class_count(root, tmp_path):
    from backmix.models import build_model
    train = backmix.loader(root, split="ant,cat", cache=tmp_path / "cache", num_workers=0, device="cpu")
    with pytest.raises(BackMixError, match="model has 4 outputs, but the split has 2 known classes"):
        backmix.rebuild(train, build_model("cnn32", 4, width=0.25), progress=False)


# --------------------------------------------------------------------------- images

def test_bmp_decodes_like_the_same_pixels_in_png(tmp_path):
    from backmix.osr_data.decode import decode_rgb
    pixels = np.random.default_rng(1).integers(0, 256, (9, 13, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.bmp")
    Image.fromarray(pixels).save(tmp_path / "a.png")
    assert torch.equal(decode_rgb(str(tmp_path / "a.bmp")), decode_rgb(str(tmp_path / "a.png")))
    assert torch.equal(decode_rgb(str(tmp_path / "a.bmp")), torch.from_numpy(pixels).permute(2, 0, 1))


def test_an_image_over_the_pixel_limit_is_refused_before_decoding(tmp_path, monkeypatch):
    from backmix.osr_data.decode import DecodeError, decode_rgb
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setenv("BACKMIX_MAX_IMAGE_PIXELS", "1199")
    with pytest.raises(DecodeError, match=r"40x30 pixels is over the limit of 1199 \(BACKMIX_MAX_IMAGE_PIXELS\)"):
        decode_rgb(str(tmp_path / "big.png"))
    monkeypatch.setenv("BACKMIX_MAX_IMAGE_PIXELS", "1200")
    assert decode_rgb(str(tmp_path / "big.png")).shape == (3, 30, 40)


def test_an_image_over_the_pixel_limit_is_skipped_under_on_error_skip(root, tmp_path, monkeypatch):
    data = shutil.copytree(root, tmp_path / "data")
    (data / "train" / "index.csv").unlink()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(data / "train" / "ant" / "big.png")
    monkeypatch.setenv("BACKMIX_MAX_IMAGE_PIXELS", str(32 * 32))
    train = backmix.loader(data, split="ant,cat", num_workers=0, device="cpu", on_error="skip", batch_size=4)
    seen = sum(len(b.labels) for b in train)
    assert seen == 12 and train.state_dict()["skipped"] == 1


def test_exif_orientation_is_not_applied(tmp_path):
    """A JPEG that says "rotate 90" decodes as stored (as torchvision's and PIL's readers do)."""
    from backmix.osr_data.decode import decode_rgb
    im = Image.fromarray(np.zeros((10, 30, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(tmp_path / "r.jpg", exif=exif)
    assert decode_rgb(str(tmp_path / "r.jpg")).shape == (3, 10, 30)


# --------------------------------------------------------------------------- the command line

@pytest.mark.parametrize("argv", [["train", "--nosuch"], ["frobnicate"], [], ["train", "--epochs", "x"]],
                         ids=["unknown-option", "unknown-command", "no-command", "wrong-type"])
def test_a_usage_error_is_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    assert e.value.code == 2
    one_line(capsys)


def test_a_run_refused_for_its_data_leaves_no_run_folder(root, tmp_path, capsys):
    run = tmp_path / "new" / "run"
    assert cli_main(train_args(root, run, "--known", "ant,zebra")) == 2
    one_line(capsys, "zebra")
    assert not run.exists()
