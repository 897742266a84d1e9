"""``backmix cache init|build|info``.

(``backmix cache show`` and ``backmix bench cache`` are instruments: ``backmix.bench`` registers them.)
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from backmix.device import DEVICE_HELP, device_option
from backmix.osr_data.options import CANVAS_MODES
from backmix.osr_data.errors import BackMixError

class FMT(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None (the help says what happens then), flags and required options."""

    def _get_help_string(self, action):
        if action.default is None or action.required or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def register(sub) -> None:
    p = sub.add_parser("init", help="create generation 0 (0.5 everywhere) for a data folder", formatter_class=FMT)
    p.add_argument("--data", type=Path, required=True, help="image folder (root/<class>/<image>) with index.csv")
    p.add_argument("--cache", type=Path, required=True, help="cache folder")
    p.add_argument("--grid", type=int, default=8, help="g of the g x g maps")
    p.add_argument("--keep", type=int, default=3, help="generations kept on disk")
    p.add_argument("--canvas-mode", choices=CANVAS_MODES, default="center",
                   help="canvases the maps are for: center = shorter side resized + centre crop, "
                        "stretch = both sides resized (loaders of the other mode are refused)")
    p.set_defaults(func=run_init)

    b = sub.add_parser("build", help="compute the next generation from a checkpoint's CAMs", formatter_class=FMT,
                       description="S <- (1 - m) S + m CAM for every image of the folder, from the model of "
                                   "CHECKPOINT (a `backmix train` last.pt/best.pt). Split the work with "
                                   "--shard k/N or launch under torchrun; the generation is published when "
                                   "all N shards are built, and a finished shard is not recomputed.")
    b.add_argument("--data", type=Path, required=True, help="image folder (train split) with index.csv")
    b.add_argument("--checkpoint", type=Path, required=True, help="model checkpoint")
    b.add_argument("--cache", type=Path, required=True, help="cache folder (created at generation 0 if absent)")
    b.add_argument("--grid", type=int, default=None,
                   help="grid of a new cache (default 8); checked against an existing one")
    b.add_argument("--keep", type=int, default=3, help="generations kept on disk (new cache)")
    b.add_argument("--canvas", type=int, default=None, help="canvas side (default: the checkpoint's config, else 40)")
    b.add_argument("--canvas-mode", choices=CANVAS_MODES, default=None,
                   help="canvases the CAMs are taken on (default: the checkpoint's config; stretch for a config "
                        "that names none, which predates the modes; center without a config); a cache of "
                        "the other mode is refused")
    b.add_argument("--momentum", type=float, default=0.1, help="share of the new CAM")
    b.add_argument("--known", default=None, metavar="SPLIT",
                   help="the model's classes: a split number (0..4) or a comma list of class names; rows of "
                        "other classes keep their maps (default: the checkpoint's known_classes, else all)")
    b.add_argument("--batch-size", type=int, default=128, help="images per forward pass")
    b.add_argument("--workers", type=int, default=2, help="decoding worker processes")
    b.add_argument("--shard", default=None, metavar="k/N",
                   help="build shard k of N (default: torchrun's RANK/WORLD_SIZE, else 0/1)")
    b.add_argument("--device", type=device_option, default="auto", help=DEVICE_HELP)
    b.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    b.set_defaults(func=run_build)

    i = sub.add_parser("info", help="generation, rows, grid, digests and size of a cache", formatter_class=FMT)
    i.add_argument("--cache", type=Path, required=True, help="cache folder")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.set_defaults(func=run_info)


def parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise BackMixError(f"--shard must look like k/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= k < n:
        raise BackMixError(f"--shard {text}: need 0 <= k < N")
    return k, n


def run_init(args) -> int:
    from backmix.osr_data.index import ImageIndex

    from .store import init_cache
    cache = init_cache(args.cache, ImageIndex.load(args.data), grid=args.grid, keep=args.keep,
                       canvas_mode=args.canvas_mode)
    print(f"cache {args.cache}: generation {cache.generation}, {len(cache)} rows, grid {cache.grid}, "
          f"{cache.canvas_mode} canvases")
    return 0


def run_build(args) -> int:
    import numpy as np

    from backmix.osr_data.index import ImageIndex
    from backmix.osr_data.normalize import IMAGENET_MEAN, IMAGENET_STD

    from backmix.models import file_digest, load_model
    from .precompute import build_generation
    from .store import ForegroundCache, init_cache

    shard = parse_shard(args.shard)
    index = ImageIndex.load(args.data)
    model, ckpt = load_model(args.checkpoint)
    config = ckpt.get("config") or {}
    known = known_classes(ckpt.get("known_classes"), args.known, index.classes, args.checkpoint)
    label_map, rows = None, None
    if known:
        if len(known) != ckpt["num_classes"]:
            raise BackMixError(f"--known names {len(known)} classes, checkpoint {args.checkpoint} has "
                               f"{ckpt['num_classes']}")
        label_map = np.full(index.num_classes, -1, dtype=np.int64)
        label_map[[index.classes.index(c) for c in known]] = np.arange(len(known))
        rows = np.flatnonzero(label_map[index.labels] >= 0)
    elif ckpt["num_classes"] != index.num_classes:
        raise BackMixError(f"checkpoint {args.checkpoint} has {ckpt['num_classes']} classes and names none; "
                           f"{args.data} has {index.num_classes}: say which with --known")
    canvas_mode = args.canvas_mode or saved_value(config, "canvas_mode", "stretch" if config else "center",
                                                  args.checkpoint)
    canvas = args.canvas or saved_value(config, "canvas", 40, args.checkpoint)
    if args.grid is None and (args.cache / "CURRENT").is_file():
        ForegroundCache(args.cache, index=index)           # an existing cache keeps its grid
    else:
        init_cache(args.cache, index, grid=args.grid or 8, keep=args.keep, canvas_mode=canvas_mode)
    generation = build_generation(args.cache, model, index, canvas=canvas, canvas_mode=canvas_mode,
                                  mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                  momentum=args.momentum, label_map=label_map, rows=rows,
                                  batch_size=args.batch_size, num_workers=args.workers, device=args.device,
                                  shard=shard, checkpoint_digest=file_digest(args.checkpoint),
                                  progress=args.progress)
    if generation is None:
        print(f"cache {args.cache}: shard {shard[0]}/{shard[1]} built; the generation is published "
              "when every shard is")
    else:
        print(f"cache {args.cache}: generation {generation} published")
    return 0


def saved_value(config: dict, key: str, default, checkpoint):
    """``config[key]`` of a checkpoint's run config (``default`` without one), refused in one line naming
    the checkpoint when it is not a value the cache builder takes (the file may be hand-made)."""
    from backmix.osr_data.decode import CANVAS_MODES
    from backmix.osr_data.limits import quoted
    value = config.get(key, default)
    ok = value in CANVAS_MODES if key == "canvas_mode" else (
        isinstance(value, int) and not isinstance(value, bool) and value >= 1)
    if not ok:
        want = f"one of {', '.join(CANVAS_MODES)}" if key == "canvas_mode" else "a whole number >= 1"
        raise BackMixError(f"checkpoint {checkpoint}: its config: {key} must be {want}, got {quoted(value)}")
    return value


def known_classes(from_checkpoint, spec: str | None, classes: tuple[str, ...], checkpoint) -> tuple[str, ...]:
    """The model's classes in head order: the checkpoint's ``known_classes``, else ``--known``, else ()."""
    from backmix.osr_data.splits import resolve_split
    if from_checkpoint:
        known = tuple(from_checkpoint)
        missing = [c for c in known if c not in classes]
        if missing:
            raise BackMixError(f"checkpoint {checkpoint} knows classes {missing} that the data set lacks")
        if spec is not None and set(resolve_split(classes, spec).known) != set(known):
            raise BackMixError(f"--known {spec} is not the classes checkpoint {checkpoint} was trained on "
                               f"({','.join(known)})")
        return known
    return resolve_split(classes, spec).known if spec is not None else ()


def run_info(args) -> int:
    from .store import cache_info
    info = cache_info(args.cache)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for k, v in info.items():
        print(f"{k:>20}: {v}")
    return 0
