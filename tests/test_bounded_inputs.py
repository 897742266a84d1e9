"""Files a user hands the project are bounded before the work that would need the memory: a config, a
splits file, an image header, a checkpoint's metadata. A small hostile file (an alias bomb, /dev/zero,
a 900000 x 1 PNG, ``width: 1e6``) is one line, at once, under a memory limit; and every other kind of
bad file (wrong encoding, a key twice, a folder, a name that is not UTF-8, a text file as checkpoint,
a full disk) is one line naming it."""
from __future__ import annotations

import io

import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import backmix
from backmix.cli import main as cli_main
from backmix.models import build_model, load_model, save_checkpoint, save_safetensors
from backmix.osr_data import DecodeError, ImageIndex
from backmix.osr_data.errors import BackMixError

from helpers import random_image_root

CLASSES = ("ant", "bee", "cat", "dog")
# The child's address space beyond what its imports mapped: what a bomb may take before it fails.
HEADROOM = 1536 << 20
CHILD_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return random_image_root(tmp_path_factory.mktemp("bounded"), CLASSES, 6, 3)


@pytest.fixture(scope="module")
def checkpoint(root) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(root.parent / "c.pt", build_model("cnn32", 2, width=0.25), arch="cnn32", num_classes=2,
                           model_kwargs={"width": 0.25}, known_classes=["ant", "cat"])


def one_line(text: str, *parts: str) -> str:
    lines = text.splitlines()
    assert len(lines) == 1 and lines[0].startswith("backmix: error: "), text[-2000:]
    for part in parts:
        assert part in lines[0], lines[0]
    assert len(lines[0]) < 400, lines[0][:400]
    return lines[0]


def train_args(root: Path, out: Path, *extra: str, split: str | None = None) -> list[str]:
    """A short run on ant and cat (``--known``), or on ``--split split``."""
    classes = ["--split", split] if split is not None else ["--known", "ant,cat"]
    return ["train", "--data", str(root), "--out", str(out), "--epochs", "1", "--width", "0.25", "--batch-size", "4",
            *classes, "--workers", "0", "--device", "cpu", "--no-progress", "--no-backmix", *extra]


def alias_bomb(key: str, levels: int) -> str:
    """YAML of a few hundred bytes that stands for 9 ** levels values once its aliases are expanded."""
    parts = ["&l1 [x,x,x,x,x,x,x,x,x]"] + [f"&l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]"
                                          for i in range(2, levels + 1)]
    return f"{key}: [{', '.join(parts)}]\n"


CHILD = textwrap.dedent("""
    import resource, sys
    import pyarrow, safetensors, torch, torchvision, yaml   # mapped before the limit: it bounds the work
    from backmix.cli import main
    size = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (size + int(sys.argv[1]), size + int(sys.argv[1])))
    sys.exit(main(sys.argv[2:]))
""")


def run_bounded(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``backmix ARGV`` in a child whose memory is what its imports took plus HEADROOM, for at most
    CHILD_TIMEOUT_S seconds."""
    return subprocess.run([sys.executable, "-c", CHILD, str(HEADROOM), "-q", *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=CHILD_TIMEOUT_S, env=dict(os.environ, OMP_NUM_THREADS="1"))


def _config_bomb(root, tmp, key):
    (tmp / "c.yaml").write_text(alias_bomb(key, 9))
    return train_args(root, tmp / "run", "--config", str(tmp / "c.yaml"))


def _big_config(root, tmp):
    with open(tmp / "c.yaml", "wb") as f:
        f.truncate(2 << 20)   # 2 MiB of NULs, sparse
    return train_args(root, tmp / "run", "--config", str(tmp / "c.yaml"))


def _deep_splits(root, tmp):
    (tmp / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    return train_args(root, tmp / "run", "--splits", str(tmp / "deep.json"), split="0")


def _wide_png(root, tmp, checkpoint):
    data = shutil.copytree(root / "train", tmp / "train", ignore=shutil.ignore_patterns("index.csv", ".backmix*"))
    Image.new("L", (900_000, 1)).save(data / "ant" / "wide.png")
    return ["cache", "build", "--checkpoint", str(checkpoint), "--data", str(data), "--cache", str(tmp / "cache"),
            "--device", "cpu", "--workers", "0", "--no-progress"]


def _wide_model(root, tmp):
    path = save_safetensors(tmp / "w.safetensors", build_model("cnn32", 2, width=0.25), arch="cnn32",
                            num_classes=2, model_kwargs={"width": 1e6}, known_classes=("ant", "cat"))
    return ["eval", "--checkpoint", str(path), "--data", str(root), "--device", "cpu", "--workers", "0"]


BOMBS = {
    "config-alias-bomb-list-option": (lambda r, t, c: _config_bomb(r, t, "open_test"), "YAML aliases"),
    "config-alias-bomb-int-option": (lambda r, t, c: _config_bomb(r, t, "epochs"), "BACKMIX_MAX_CONFIG_VALUES"),
    "config-dev-zero": (lambda r, t, c: train_args(r, t / "run", "--config", "/dev/zero"),
                        "--config /dev/zero is not a regular file"),
    "config-over-the-size-limit": (lambda r, t, c: _big_config(r, t), "BACKMIX_MAX_CONFIG_BYTES"),
    "splits-dev-zero": (lambda r, t, c: train_args(r, t / "run", "--splits", "/dev/zero", split="0"),
                        "--splits /dev/zero is not a regular file"),
    "splits-nested-too-deep": (lambda r, t, c: _deep_splits(r, t), "deep.json: nested too deep"),
    "png-900000x1": (lambda r, t, c: _wide_png(r, t, c), "wide.png does not decode: 900000x1 pixels"),
    "safetensors-width-1e6": (lambda r, t, c: _wide_model(r, t), "w.safetensors: its weights do not fit"),
}


@pytest.mark.parametrize("bomb", list(BOMBS))
def test_a_small_file_standing_for_a_huge_input_is_one_line_at_once_within_a_memory_limit(root, checkpoint,
                                                                                         tmp_path, bomb):
    make, says = BOMBS[bomb]
    done = run_bounded(make(root, tmp_path, checkpoint), tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    one_line(done.stderr, says)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- --config

@pytest.mark.parametrize("text, says", [
    (b"\xff\xfe\x00e", "c.yaml is not UTF-8 text"),
    (b"epochs: 1\nlr: 0.01\nepochs: 2\n", "c.yaml gives --epochs twice"),
    (b"grid: 0\n", "--grid must be >= 1, got 0"),
    (b"epochs: &a [*a]\n", "YAML aliases"),
    (b"epochs: " + b"[" * 5000 + b"]" * 5000 + b"\n", "c.yaml is nested too deep"),
    (alias_bomb("epochs", 4).encode(), "c.yaml: epochs must be int, got [["),
], ids=["utf16", "key-twice", "grid-0", "recursive-alias", "deep", "long-value-quoted-short"])
def test_a_config_file_that_cannot_be_a_run_config_is_one_line(root, tmp_path, capsys, text, says):
    (tmp_path / "c.yaml").write_bytes(text)
    assert cli_main(train_args(root, tmp_path / "run", "--config", str(tmp_path / "c.yaml"))) == 2
    one_line(capsys.readouterr().err, says)
    assert not (tmp_path / "run").exists()


def test_a_bound_is_set_by_its_environment_variable_and_a_bad_one_is_one_line(root, tmp_path, capsys,
                                                                              monkeypatch):
    (tmp_path / "c.yaml").write_text("epochs: 1\n" + "#" * 100 + "\n")
    monkeypatch.setenv("BACKMIX_MAX_CONFIG_BYTES", "100")
    assert cli_main(train_args(root, tmp_path / "run", "--config", str(tmp_path / "c.yaml"))) == 2
    one_line(capsys.readouterr().err, "c.yaml is larger than 100 bytes (BACKMIX_MAX_CONFIG_BYTES)")
    monkeypatch.setenv("BACKMIX_MAX_CONFIG_BYTES", "lots")
    assert cli_main(train_args(root, tmp_path / "run", "--config", str(tmp_path / "c.yaml"))) == 2
    one_line(capsys.readouterr().err, "BACKMIX_MAX_CONFIG_BYTES must be a positive number of bytes, got 'lots'")
    from backmix.trainers.config_file import read_config_file
    monkeypatch.setenv("BACKMIX_MAX_CONFIG_BYTES", "111")
    assert read_config_file(tmp_path / "c.yaml") == {"epochs": 1}


def test_grid_zero_is_refused_where_canvas_and_crop_are_checked(root):
    with pytest.raises(BackMixError, match=r"--grid must be >= 1, got 0"):
        backmix.loader(root, split="ant,cat", grid=0, num_workers=0, device="cpu")


# --------------------------------------------------------------------------- --splits, --split

@pytest.mark.parametrize("spec", ["\u00b2", "\u0663", "1\u00b2"])
def test_a_split_of_digits_that_are_not_ascii_is_not_a_split_number(root, tmp_path, capsys, spec):
    from backmix.osr_data.protocols import protocol
    from backmix.osr_data.splits import split_number
    assert spec.isdigit() and split_number(spec) is None and split_number(" 3 ") == 3
    with pytest.raises(BackMixError, match=f"split names class '{spec}', which does not exist"):
        backmix.open_set_data(root, split=spec)
    with pytest.raises(BackMixError, match=f"--split is a split number 0..4, not '{spec}'"):
        protocol("cifar10").resolve(tuple(CLASSES), spec)
    (tmp_path / "s.json").write_text('[["ant", "bee"]]')
    assert cli_main(train_args(root, tmp_path / "run", "--splits", str(tmp_path / "s.json"), split=spec)) == 2
    one_line(capsys.readouterr().err, f"not '{spec}'")


def test_a_splits_path_that_is_not_a_regular_file_says_what_it_is(root, tmp_path):
    from backmix.osr_data.protocols import load_splits_file
    with pytest.raises(BackMixError, match=f"^--splits {tmp_path} is a folder; give a file$"):
        load_splits_file(tmp_path)
    with pytest.raises(BackMixError, match="^--splits /dev/zero is not a regular file$"):
        backmix.open_set_data(root, split="0", splits_file="/dev/zero")


# --------------------------------------------------------------------------- --pretrained

@pytest.mark.parametrize("what", ["folder", "device"])
def test_pretrained_that_is_not_a_regular_file_says_what_it_is_before_any_work(root, tmp_path, capsys, what):
    path, says = (tmp_path, "is a folder; give a file") if what == "folder" else ("/dev/zero", "is not a regular file")
    assert cli_main(train_args(root, tmp_path / "run", "--pretrained", str(path))) == 2
    assert capsys.readouterr().err == f"backmix: error: --pretrained {path} {says}\n"
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- images and names

def test_images_decode_without_warnings_as_their_first_frame_or_are_refused_from_the_header(tmp_path, monkeypatch):
    from backmix.osr_data.decode import decode_rgb
    frames = [np.full((20, 30, 3), 80 * i, np.uint8) for i in (1, 2, 3)]
    Image.fromarray(frames[0]).save(tmp_path / "anim.png", format="GIF", save_all=True,
                                    append_images=[Image.fromarray(f) for f in frames[1:]])
    assert torch.equal(decode_rgb(str(tmp_path / "anim.png")), torch.from_numpy(frames[0]).permute(2, 0, 1))
    Image.fromarray(frames[1]).save(tmp_path / "a.bmp")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)   # torch's non-writable array warning, on every BMP before
        assert torch.equal(decode_rgb(str(tmp_path / "a.bmp")), torch.from_numpy(frames[1]).permute(2, 0, 1))
    Image.new("L", (101, 1)).save(tmp_path / "wide.png")
    with pytest.raises(DecodeError, match=r"wide.png does not decode: 101x1 pixels: one side is over 100 times the "
                                          r"other \(BACKMIX_MAX_IMAGE_ASPECT\)"):
        decode_rgb(str(tmp_path / "wide.png"))
    monkeypatch.setenv("BACKMIX_MAX_IMAGE_ASPECT", "101")
    assert decode_rgb(str(tmp_path / "wide.png")).shape == (3, 1, 101)


@pytest.mark.parametrize("mode, save", [("RGB", {}), ("RGB", {"progressive": True}), ("L", {}), ("CMYK", {}),
                                        ("RGB", {"exif": b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12"
                                                          b"\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00"})])
def test_a_jpeg_header_gives_the_size_as_stored_as_pil_reads_it(mode, save):
    from backmix.osr_data.decode import check_pixels, jpeg_size
    buf = io.BytesIO()
    Image.new(mode, (37, 21)).save(buf, format="JPEG", **save)
    data = buf.getvalue()
    assert jpeg_size(data) == (21, 37) == check_pixels("a.jpg", np.frombuffer(data, np.uint8))
    assert jpeg_size(data[:20]) is None   # cut short before the frame header


def test_an_image_that_is_not_a_jpeg_has_its_size_from_pil_or_none():
    from backmix.osr_data.decode import check_pixels, jpeg_size
    buf = io.BytesIO()
    Image.new("RGB", (37, 21)).save(buf, format="PNG")
    assert jpeg_size(buf.getvalue()) is None and check_pixels("a.png", buf.getvalue()) == (21, 37)
    assert check_pixels("a.txt", b"not an image") is None and jpeg_size(b"") is None


def test_a_wide_image_is_skipped_under_on_error_skip(root, tmp_path):
    data = shutil.copytree(root, tmp_path / "data")
    (data / "train" / "index.csv").unlink()
    Image.new("RGB", (9000, 2)).save(data / "train" / "ant" / "wide.png")
    train = backmix.loader(data, split="ant,cat", num_workers=0, device="cpu", on_error="skip", batch_size=4)
    assert sum(len(b.labels) for b in train) == 12 and train.state_dict()["skipped"] == 1


@pytest.mark.parametrize("entry", ["file", "class folder", "link loop"])
def test_a_folder_entry_that_cannot_be_indexed_is_one_line_naming_it(root, tmp_path, capsys, entry):
    data = shutil.copytree(root / "train", tmp_path / "train", ignore=shutil.ignore_patterns("index.csv", ".backmix*"))
    image = sorted((data / "ant").iterdir())[0]
    if entry == "file":
        shutil.copy(image, os.fsencode(data / "ant") + b"/\xff\xfe.png")
        says = f"file name {data}/ant/\\xff\\xfe.png is not valid UTF-8; rename it"
    elif entry == "class folder":
        os.mkdir(os.fsencode(data) + b"/\xffcls")
        shutil.copy(image, os.fsencode(data) + b"/\xffcls/0.png")
        says = f"class folder name {data}/\\xffcls is not valid UTF-8; rename it"
    else:
        os.symlink("loop.png", data / "ant" / "loop.png")
        says = f"{data}/ant/loop.png is a symbolic link that never reaches a file (a loop of links); remove the link"
    with pytest.raises(BackMixError) as e:
        ImageIndex.scan(data)
    assert str(e.value) == says
    assert cli_main(["cache", "init", "--data", str(data), "--cache", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err == f"backmix: error: {says}\n"


# --------------------------------------------------------------------------- checkpoints

def _checkpoint_with(tmp_path: Path, checkpoint: Path, **change) -> Path:
    """A copy of ``checkpoint`` with ``change``, named after the first key changed."""
    ckpt = torch.load(checkpoint, weights_only=True)
    path = tmp_path / f"{next(iter(change))}.pt"
    torch.save({**ckpt, **change}, path)
    return path


def test_a_checkpoint_whose_contents_do_not_fit_is_one_line_naming_the_file(root, checkpoint, tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("# backmix train options\nepochs: 1\n")
    (tmp_path / "junk.pt").write_bytes(bytes(range(256)))
    model = build_model("cnn32", 2, width=0.25)
    cases = {
        tmp_path / "config.yaml": " is not a torch checkpoint (a text file?)",
        tmp_path / "junk.pt": " is not a torch checkpoint (neither a zip archive nor a pickle)",
        save_safetensors(tmp_path / "inf.safetensors", model, arch="cnn32", num_classes=2,
                         model_kwargs={"width": 1e308}): ": its model_kwargs {'width': 1e+308} do not fit a cnn32",
        save_safetensors(tmp_path / "half.safetensors", model, arch="cnn32", num_classes=2,
                         model_kwargs={"width": 0.5}): ": its weights do not fit its arch, num_classes and model_kwargs",
        _checkpoint_with(tmp_path, checkpoint, config="canvas: 40"): ": its config is not a mapping",
        _checkpoint_with(tmp_path, checkpoint, num_classes="two"): ": its num_classes is not a whole number >= 1",
        _checkpoint_with(tmp_path, checkpoint, known_classes="ant,cat"): ": its known_classes is not a list of class",
    }
    for path, says in cases.items():
        with pytest.raises(BackMixError) as e:
            load_model(path)
        assert str(e.value).startswith(f"checkpoint {path}{says}"), str(e.value)
    earlier = {"canvas": 40}   # a config of before the canvas modes
    bad_canvas = {"canvas": -5, "canvas_mode": "center", "val_fraction": 0.1}
    for config, by_eval, by_build in (
            (earlier, "its config: config was written by an earlier backmix (it has no canvas_mode): `backmix "
                      "train` writes a run of this one",
             " was written by an earlier backmix (its config has no canvas_mode): give --canvas-mode, or `backmix "
             "train` writes a checkpoint of this one"),
            (bad_canvas, "its config: canvas (-5) and crop (32) sizes must be positive",
             ": its config: canvas must be a whole number >= 1, got -5")):
        path = _checkpoint_with(tmp_path, checkpoint, config=config)
        assert cli_main(["eval", "--checkpoint", str(path), "--data", str(root), "--device", "cpu",
                         "--workers", "0"]) == 2
        one_line(capsys.readouterr().err, f"checkpoint {path}: {by_eval}")
        assert cli_main(["cache", "build", "--checkpoint", str(path), "--data", str(root / "train"), "--cache",
                         str(tmp_path / "cache"), "--device", "cpu", "--workers", "0", "--no-progress"]) == 2
        one_line(capsys.readouterr().err.replace("backmix: mixing on cpu\n", ""),
                 f"checkpoint {path}{by_build}")
    assert not (tmp_path / "cache").exists()


def test_a_plain_pickle_with_a_global_keeps_the_code_execution_wording(tmp_path):
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, ("exit 0",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"a": Payload()}, protocol=4))
    with pytest.raises(BackMixError, match=r"evil.pt needs posix.system to load, .* could run code$"):
        load_model(tmp_path / "evil.pt")


# --------------------------------------------------------------------------- a full disk

def test_a_full_disk_at_the_checkpoint_write_is_one_line_and_leaves_no_temporary(root, tmp_path, capsys):
    """The run's checkpoint temporaries are links to /dev/full (ENOSPC on every write): torch's own
    zip writer said RuntimeError 'unexpected pos' there."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("last.pt", "best.pt"):
        os.symlink("/dev/full", run / f".{name}.tmp-{os.getpid()}")
    assert cli_main(train_args(root, run)) == 2
    line = one_line(capsys.readouterr().err, "no space left on the device writing", str(run))
    written = next(name for name in ("last.pt", "best.pt") if f"writing {run / name};" in line)
    other = ({"last.pt", "best.pt"} - {written}).pop()
    # the temporary of the failed write is gone; the other link was never written to
    assert [p.name for p in run.iterdir() if ".tmp" in p.name] == [f".{other}.tmp-{os.getpid()}"]
    assert not (run / "last.pt").exists() and not (run / "best.pt").exists()


def test_every_bound_is_defined_once_and_listed_in_readme_and_the_security_page():
    from backmix.osr_data import limits
    bounds = [v for v in vars(limits).values() if isinstance(v, limits.Limit)]
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    readme_table = readme.split("## Bad input", 1)[1].split("\n## ", 1)[0]
    security = (root / "docs" / "security.md").read_text()
    limits_table = security.split("## Limits and environment variables", 1)[1].split("\n## ", 1)[0]
    assert len({b.env for b in bounds}) == len(bounds) == 5
    assert [b.env for b in bounds if f"`{b.env}`" not in readme_table] == []
    for b in bounds:    # the security page's table gives each variable's default as the code has it
        row = next(line for line in limits_table.splitlines() if line.startswith(f"| `{b.env}` |"))
        default = row.split("|")[2].strip()
        assert default in (f"{b.default:,}", f"{b.default >> 20} MiB"), (b.env, default)
