"""The cases of ``scripts/probe.py``: hostile input to every command and to the library, beyond the
cases the test suite holds. ``{D}`` is the case's own folder, ``{S}`` the shared
one: S/data (4 classes, train/ and test/), S/run/best.pt (trained 1 epoch on ant,cat), S/cache."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from probe import Case, write_data, write_images

SHARED = {}


def shared_setup(shared: Path, backmix) -> None:
    write_data(shared / "data")
    for words in (["train", "--data", f"{shared}/data", "--out", f"{shared}/run", "--epochs", "1", "--width",
                   "0.25", "--batch-size", "8", "--known", "ant,cat", "--workers", "0", "--device", "cpu",
                   "--no-progress", "--no-backmix"],
                  ["cache", "init", "--data", f"{shared}/data/train", "--cache", f"{shared}/cache"]):
        done = backmix(words)
        if done.returncode:
            raise SystemExit(f"probe setup failed: backmix {' '.join(words)}\n{done.stderr}")
    SHARED["root"] = shared


def copy_data(d: Path) -> Path:
    shutil.copytree(SHARED["root"] / "data", d / "data")
    return d / "data"


def copy_cache(d: Path) -> Path:
    shutil.copytree(SHARED["root"] / "cache", d / "cache")
    return d / "cache"


def checkpoint_variant(**change):
    """Setup: D/c.pt, the shared checkpoint's weights with ``change`` applied (None deletes a key)."""
    def setup(d: Path) -> None:
        import torch
        # our own file, written by the setup a moment ago: its numpy RNG state needs the full unpickler
        ckpt = torch.load(SHARED["root"] / "run" / "best.pt", map_location="cpu", weights_only=False)
        ckpt = {k: ckpt[k] for k in ("arch", "num_classes", "model_kwargs", "state_dict", "known_classes", "config")}
        for k, v in change.items():
            if v is None:
                ckpt.pop(k)
            else:
                ckpt[k] = v(ckpt[k]) if callable(v) else v
        torch.save(ckpt, d / "c.pt")
    return setup


def touch(name: str, content: bytes = b""):
    def setup(d: Path) -> None:
        (d / name).write_bytes(content)
    return setup


def data_with(change):
    """Setup: D/data, a copy of the shared data set with ``change(D/data)`` applied, indexes re-made."""
    def setup(d: Path) -> None:
        root = copy_data(d)
        change(root)
        for split in ("train", "test"):
            (root / split / "index.csv").unlink(missing_ok=True)
    return setup


def index_text(text: str):
    def setup(d: Path) -> None:
        root = copy_data(d)
        (root / "train" / "index.csv").write_text(text)
    return setup


def image_in_train(save):
    return data_with(lambda root: save(root / "train" / "ant"))


def cache_file(change):
    def setup(d: Path) -> None:
        change(copy_cache(d))
    return setup


def truncate_generation(cache: Path) -> None:
    gen = max((p for p in cache.rglob("*") if p.is_file() and p.name != "CURRENT"), key=lambda p: p.stat().st_size)
    gen.write_bytes(gen.read_bytes()[: gen.stat().st_size // 2])


def symlink_loop(root: Path) -> None:
    os.symlink("..", root / "train" / "ant" / "loop")


def save_array(name: str, array: np.ndarray, **kw):
    return lambda folder: Image.fromarray(array).save(folder / name, **kw)


def built(d: Path, proc) -> bool:
    return "generation 1 published" in proc.stdout


# decodes every image of the known classes ant and cat (show draws a sample, so it may miss a file)
BUILD = ["cache", "build", "--checkpoint", "{S}/run/best.pt", "--data", "{D}/data/train", "--cache", "{D}/c",
         "--device", "cpu", "--workers", "0", "--no-progress"]
TRAIN = ["train", "--data", "{S}/data", "--out", "{D}/run", "--epochs", "1", "--width", "0.25", "--batch-size",
         "8", "--known", "ant,cat", "--workers", "0", "--device", "cpu", "--no-progress"]
EVAL = ["eval", "--checkpoint", "{D}/c.pt", "--data", "{S}/data", "--device", "cpu", "--workers", "0"]
LIB = "import os, backmix; S = os.environ['PROBE_SHARED']; D = os.environ['PROBE_DIR']\n"


def train(*extra: str) -> list[str]:
    words = list(TRAIN)
    for i in range(0, len(extra), 2):   # an option given replaces the base one
        if extra[i] in words:
            words[words.index(extra[i]) + 1] = extra[i + 1]
        else:
            words += list(extra[i:i + 2])
    return words


def cases() -> list[Case]:
    return [
        # the command line itself
        Case("cli-no-command", []),
        Case("cli-unknown-command", ["frobnicate"]),
        Case("cli-option-of-wrong-type", train("--epochs", "abc"), says="--epochs"),
        Case("cli-choice-not-offered", ["data", "prepare", "--dataset", "nosuch", "--out", "{D}/x"]),
        # data prepare
        Case("prepare-out-is-a-file", ["data", "prepare", "--out", "{D}/f"], setup=touch("f"), says="f"),
        Case("prepare-prior-above-1", ["data", "prepare", "--dataset", "digits-on-photos", "--prior", "1.5",
                                       "--out", "{D}/x"], says="--prior"),
        Case("prepare-prior-nan", ["data", "prepare", "--dataset", "digits-on-photos", "--prior", "nan",
                                   "--out", "{D}/x"], says="--prior"),
        Case("prepare-seed-negative", ["data", "prepare", "--seed", "-1", "--out", "{D}/x"], says="--seed"),
        # cache init / info
        Case("cache-init-data-missing", ["cache", "init", "--data", "{D}/nope", "--cache", "{D}/c"], says="nope"),
        Case("cache-init-data-is-a-file", ["cache", "init", "--data", "{D}/f", "--cache", "{D}/c"], setup=touch("f")),
        Case("cache-init-grid-negative", ["cache", "init", "--data", "{S}/data/train", "--cache", "{D}/c",
                                          "--grid", "-2"], says="grid"),
        Case("cache-init-keep-zero", ["cache", "init", "--data", "{S}/data/train", "--cache", "{D}/c",
                                      "--keep", "0"], says="keep"),
        Case("cache-info-missing", ["cache", "info", "--cache", "{D}/nope"], says="nope"),
        Case("cache-info-current-points-outside", ["cache", "info", "--cache", "{D}/cache"],
             setup=cache_file(lambda c: (c / "CURRENT").write_text("../../../../etc/passwd\n"))),
        Case("cache-info-current-empty", ["cache", "info", "--cache", "{D}/cache"],
             setup=cache_file(lambda c: (c / "CURRENT").write_text(""))),
        Case("cache-read-truncated-generation", ["show", "--data", "{S}/data", "--cache", "{D}/cache",
                                                 "--out", "{D}/s.png"], setup=cache_file(truncate_generation)),
        # index files
        Case("index-csv-empty", ["cache", "init", "--data", "{D}/data/train", "--cache", "{D}/c"],
             setup=index_text("")),
        Case("index-csv-foreign-header", ["cache", "init", "--data", "{D}/data/train", "--cache", "{D}/c"],
             setup=index_text("name,size\nant/000.png,12\n")),
        Case("index-csv-label-not-a-number", ["cache", "init", "--data", "{D}/data/train", "--cache", "{D}/c"],
             setup=index_text("path,label\nant/000.png,zero\n")),
        Case("index-csv-binary-garbage", ["cache", "init", "--data", "{D}/data/train", "--cache", "{D}/c"],
             setup=lambda d: (copy_data(d) / "train" / "index.csv").write_bytes(bytes(range(256)) * 4)),
        # folders and images
        Case("class-folder-symlink-loop", ["cache", "init", "--data", "{D}/data/train", "--cache", "{D}/c"],
             expect="ok", setup=data_with(symlink_loop), timeout=60),
        Case("image-of-zero-bytes", BUILD, setup=image_in_train(lambda f: (f / "000.png").write_bytes(b"")),
             says="000.png"),
        Case("image-truncated-png", BUILD, setup=image_in_train(
            lambda f: (f / "000.png").write_bytes((f / "000.png").read_bytes()[:60])), says="000.png"),
        Case("image-1x1-pixel", BUILD, expect="ok", check=built,
             setup=image_in_train(save_array("000.png", np.zeros((1, 1, 3), np.uint8)))),
        Case("image-grayscale-and-rgba", BUILD, expect="ok", check=built, setup=image_in_train(
            lambda f: (save_array("000.png", np.zeros((20, 30), np.uint8))(f),
                       save_array("001.png", np.zeros((20, 30, 4), np.uint8))(f)))),
        Case("image-16-bit-png", BUILD, expect="ok", check=built, setup=image_in_train(
            lambda f: Image.fromarray(np.full((20, 20), 40000, np.uint16)).save(f / "000.png"))),
        Case("image-png-named-jpg", BUILD, expect="ok", check=built, setup=image_in_train(
            lambda f: os.replace(f / "000.png", f / "000.jpg"))),
        Case("non-image-and-hidden-files-ignored", BUILD, expect="ok", check=built, setup=image_in_train(
            lambda f: ((f / "notes.txt").write_text("hi"), (f / ".DS_Store").write_bytes(b"\0\1")))),
        Case("class-name-with-comma-and-accent", BUILD, expect="ok", check=built, setup=data_with(
            lambda root: [os.rename(root / s / "dog", root / s / "chien,é") for s in ("train", "test")])),
        # show
        Case("show-out-in-missing-folder", ["show", "--data", "{S}/data", "--out", "{D}/no/such/s.png"],
             expect="ok", check=lambda d, p: (d / "no/such/s.png").is_file()),
        Case("show-n-zero", ["show", "--data", "{S}/data", "--out", "{D}/s.png", "--n", "0"], says="--n"),
        Case("show-n-negative", ["show", "--data", "{S}/data", "--out", "{D}/s.png", "--n", "-4"], says="--n"),
        # train
        Case("train-epochs-zero", train("--epochs", "0"), says="--epochs"),
        Case("train-batch-size-zero", train("--batch-size", "0"), says="--batch-size"),
        Case("train-lr-inf", train("--lr", "inf"), says="--lr"),
        Case("train-workers-negative", train("--workers", "-1"), says="--workers"),
        Case("train-known-twice", train("--known", "ant,ant"), says="ant"),
        Case("train-known-not-a-class", train("--known", "ant,zebra"), says="zebra"),
        Case("train-known-every-class", train("--known", "ant,bee,cat,dog")),
        Case("train-split-out-of-range", ["train", "--data", "{S}/data", "--out", "{D}/run", "--split", "9",
                                          "--device", "cpu"], says="9"),
        Case("train-arch-unknown", train("--arch", "nosuchnet"), says="nosuchnet"),
        Case("train-arch-timm-unknown", train("--arch", "timm:nosuch_model"), says="nosuch_model"),
        Case("train-seed-beyond-64-bits", train("--seed", "99999999999999999999999"), says="--seed"),
        Case("train-crop-larger-than-canvas", train("--crop", "64", "--canvas", "40"), says="crop"),
        Case("train-momentum-above-1", train("--momentum", "2"), says="--momentum"),
        Case("train-resume-of-an-empty-folder", train("--resume"), says="run"),
        Case("train-out-under-a-file", train("--out", "{D}/f/run"), setup=touch("f")),
        Case("train-data-without-test", train("--data", "{D}/data"),
             setup=data_with(lambda root: shutil.rmtree(root / "test")), says="test"),
        # eval of damaged or foreign checkpoints
        Case("eval-checkpoint-empty-file", EVAL, setup=touch("c.pt"), says="c.pt"),
        Case("eval-checkpoint-random-bytes", EVAL, setup=touch("c.pt", bytes(range(256)) * 8), says="c.pt"),
        Case("eval-checkpoint-a-list", EVAL, setup=lambda d: __import__("torch").save([1, 2], d / "c.pt"),
             says="c.pt"),
        Case("eval-checkpoint-weights-of-wrong-shape", EVAL, says="c.pt", setup=checkpoint_variant(
            state_dict=lambda sd: {k: v.new_zeros(*(s + 1 for s in v.shape)) if v.ndim else v for k, v in sd.items()})),
        Case("eval-checkpoint-unknown-arch", EVAL, setup=checkpoint_variant(arch="nosuchnet"), says="nosuchnet"),
        Case("eval-checkpoint-negative-classes", EVAL, setup=checkpoint_variant(num_classes=-2), says="c.pt"),
        Case("eval-checkpoint-classes-a-string", EVAL, setup=checkpoint_variant(num_classes="two"), says="c.pt"),
        Case("eval-checkpoint-foreign-model-kwargs", EVAL, setup=checkpoint_variant(model_kwargs={"evil": 1}),
             says="c.pt"),
        Case("eval-checkpoint-classes-not-in-data", EVAL, setup=checkpoint_variant(known_classes=["yak", "gnu"]),
             says="yak"),
        Case("eval-data-missing", ["eval", "--checkpoint", "{S}/run/best.pt", "--data", "{D}/nope",
                                   "--device", "cpu"], says="nope"),
        Case("eval-json-is-json", ["eval", "--checkpoint", "{S}/run/best.pt", "--data", "{S}/data", "--device",
                                   "cpu", "--workers", "0", "--json"], expect="ok",
             check=lambda d, p: "accuracy" in __import__("json").loads(p.stdout.strip().splitlines()[-1])),
        # bench
        Case("bench-loader-unknown-backend", ["bench", "loader", "--data", "{S}/data/train", "--backend", "nosuch",
                                              "--device", "cpu"], says="nosuch"),
        Case("bench-loader-zero-batches", ["bench", "loader", "--data", "{S}/data/train", "--backend", "reference",
                                           "--batches", "0", "--device", "cpu"], says="--batches"),
        # the library
        Case("lib-open-set-data-missing", code=LIB + "backmix.open_set_data(D + '/nope')", says="nope"),
        Case("lib-loader-batch-size-zero", code=LIB + "backmix.loader(S + '/data', split='ant,cat', batch_size=0)",
             says="batch size"),
        Case("lib-loader-unknown-backend", code=LIB + "backmix.loader(S + '/data', split='ant,cat', backend='x')",
             says="x"),
        Case("lib-loader-canvas-negative", code=LIB + "backmix.loader(S + '/data', split='ant,cat', canvas=-8)",
             says="canvas"),
        Case("lib-load-model-missing", code=LIB + "from backmix.models import load_model; load_model(D + '/no.pt')",
             says="no.pt"),
        Case("lib-build-model-zero-classes", code=LIB + "from backmix.models import build_model; "
                                                        "build_model('cnn32', 0)", says="num_classes"),
        Case("lib-build-model-negative-width", code=LIB + "from backmix.models import build_model; "
                                                          "build_model('cnn32', 2, width=-1)", says="width"),
        Case("lib-evaluate-not-a-model", code=LIB + "d = backmix.open_set_data(S + '/data', 'ant,cat')\n"
                                                    "backmix.evaluate('model', backmix.loader(d, train=False), d)",
             says="model"),
    ]
