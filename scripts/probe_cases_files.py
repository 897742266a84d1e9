"""More cases of ``scripts/probe.py``: the files a user hands the project (a config, a splits file,
pretrained weights, checkpoints, images and their names), one case per kind of hostile file. ``{D}``
and ``{S}`` as in ``probe_cases.py``, whose shared folder these cases read."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from probe import Case
from probe_cases import BUILD, EVAL, LIB, SHARED, checkpoint_variant, data_with, image_in_train, touch, train


def alias_bomb(key: str, levels: int = 9) -> bytes:
    """A few hundred bytes of YAML that stand for 9 ** levels values once its aliases are expanded."""
    parts = ["&l1 [x,x,x,x,x,x,x,x,x]"] + [f"&l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]"
                                          for i in range(2, levels + 1)]
    return f"{key}: [{', '.join(parts)}]\n".encode()


def train_split(spec: str, *extra: str) -> list[str]:
    """``train`` with ``--split spec`` in place of its ``--known``; quiet (see QUIET_BUILD)."""
    words = train(*extra)
    at = words.index("--known")
    words[at:at + 2] = ["--split", spec]
    return ["-q", *words]


# errors met once a command runs come after its "mixing on cpu" line: -q leaves them alone on stderr
QUIET_BUILD = ["-q", *BUILD]


def config(text: bytes, *extra: str) -> dict:
    return dict(args=train("--config", "{D}/c.yaml", *extra), setup=touch("c.yaml", text))


def animated_gif(folder: Path) -> None:
    frames = [Image.fromarray(np.full((32, 32, 3), 80 * i, np.uint8)) for i in range(3)]
    frames[0].save(folder / "000.png", format="GIF", save_all=True, append_images=frames[1:])


def odd_name(name: bytes, folder: bool = False):
    """A copy of an image under a name that is not UTF-8: a file of class ant, or a class folder's."""
    def change(root: Path) -> None:
        image = (root / "train" / "ant" / "000.png").read_bytes()
        where = os.fsencode(root / "train") + b"/" + (name if folder else b"ant/" + name)
        if folder:
            os.mkdir(where)
            where += b"/000.png"
        with open(where, "wb") as f:
            f.write(image)
    return data_with(change)


def safetensors_with(**meta):
    """Setup: D/w.safetensors, the shared checkpoint's weights with metadata ``meta``."""
    def setup(d: Path) -> None:
        import torch
        from safetensors.torch import save_file
        ckpt = torch.load(SHARED["root"] / "run" / "best.pt", map_location="cpu", weights_only=False)
        save_file({k: v.contiguous() for k, v in ckpt["state_dict"].items()}, str(d / "w.safetensors"),
                  metadata={"arch": "cnn32", "num_classes": "2", "known_classes": '["ant", "cat"]', **meta})
    return setup


def no_decode_warning(d: Path, proc) -> bool:
    return "generation 1 published" in proc.stdout and "Warning" not in proc.stderr


def cases() -> list[Case]:
    return [
        # --config
        Case("config-not-utf8", **config(b"\xff\xfe\x00e"), says="is not UTF-8 text"),
        Case("config-grid-zero", **config(b"grid: 0\n"), says="--grid must be >= 1, got 0"),
        Case("config-alias-bomb", **config(alias_bomb("epochs")), says="YAML aliases", timeout=60),
        Case("config-key-twice", **config(b"epochs: 1\nlr: 0.01\nepochs: 2\n"), says="gives --epochs twice"),
        Case("config-dev-zero", train("--config", "/dev/zero"), says="is not a regular file", timeout=60),
        # --splits and --split
        Case("splits-dev-zero", train_split("0", "--splits", "/dev/zero"), says="is not a regular file",
             timeout=60),
        Case("splits-nested-too-deep", train_split("0", "--splits", "{D}/deep.json"), says="nested too deep",
             setup=touch("deep.json", b"[" * 100000 + b"]" * 100000)),
        Case("split-not-ascii-digits", train_split("\u00b2"), says="\u00b2"),
        Case("lib-split-not-ascii-digits", code=LIB + "backmix.open_set_data(S + '/data', split='\u00b2')",
             says="\u00b2"),
        # --pretrained
        Case("pretrained-a-folder", train("--pretrained", "{D}"), says="is a folder"),
        # images and names
        Case("image-animated-gif-named-png", BUILD, expect="ok", check=lambda d, p: "published" in p.stdout,
             setup=image_in_train(animated_gif)),
        Case("image-900000x1-png", QUIET_BUILD, says="BACKMIX_MAX_IMAGE_ASPECT",
             setup=image_in_train(lambda f: Image.new("L", (900000, 1)).save(f / "000.png"))),
        Case("image-bmp-without-warning", BUILD, expect="ok", check=no_decode_warning,
             setup=image_in_train(lambda f: Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(f / "x.bmp"))),
        Case("file-name-not-utf8", QUIET_BUILD, says="rename it", setup=odd_name(b"\xff\xfe.jpg")),
        Case("class-name-not-utf8", QUIET_BUILD, says="rename it", setup=odd_name(b"\xffcls", folder=True)),
        Case("image-symlink-loop", QUIET_BUILD, says="loop.png",
             setup=image_in_train(lambda f: os.symlink("loop.png", f / "loop.png"))),
        # checkpoints
        Case("eval-safetensors-width-1e6", ["eval", "--checkpoint", "{D}/w.safetensors", "--data", "{S}/data",
                                            "--device", "cpu", "--workers", "0"],
             setup=safetensors_with(model_kwargs=json.dumps({"width": 1e6})), says="w.safetensors", timeout=60),
        Case("eval-checkpoint-config-canvas-negative", EVAL, says="c.pt: its config",
             setup=checkpoint_variant(config=lambda c: {**c, "canvas": -5})),
        Case("eval-checkpoint-config-a-string", EVAL, says="its config is not a mapping",
             setup=checkpoint_variant(config="canvas: 40")),
        Case("eval-checkpoint-a-text-file", EVAL, says="is not a torch checkpoint",
             setup=touch("c.pt", b"# backmix train options\nepochs: 1\n")),
    ]
