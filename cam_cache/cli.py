"""``backmix cache init|build|info``.

(``backmix cache show`` and ``backmix bench cache`` are instruments: ``backmix.bench`` registers them.)
"""
from __future__ import annotations

import json
from pathlib import Path

from backmix.options import DefaultsFormatter, add_options, default_of
from backmix.osr_data.errors import BackMixError

FMT = DefaultsFormatter
# The cache's own defaults (those of the function a command calls), read without importing torch:
# this module registers `cache info` too, whose --help stays fast.
INIT = "backmix.cam_cache.store:init_cache"
# The canvas of a checkpoint whose config names none (the loader's default, which this stage, before
# the pipeline, cannot import).
CANVAS_WITHOUT_CONFIG = 40


def register(sub) -> None:
    p = sub.add_parser("init", help="create generation 0 (0.5 everywhere) for a data folder", formatter_class=FMT)
    p.add_argument("--data", type=Path, required=True, help="image folder (root/<class>/<image>) with index.csv")
    p.add_argument("--cache", type=Path, required=True, help="cache folder")
    add_options(p, ("grid",), defaults={"grid": default_of(f"{INIT}.grid")})
    p.add_argument("--keep", type=int, default=3, help="generations kept on disk")
    # the maps are for canvases of this mode: loaders of the other mode are refused
    add_options(p, ("canvas_mode",), defaults={"canvas_mode": default_of(f"{INIT}.canvas_mode")})
    p.set_defaults(func=run_init)

    b = sub.add_parser("build", help="compute the next generation from a checkpoint's CAMs", formatter_class=FMT,
                       description="S <- (1 - m) S + m CAM for every image of the folder, from the model of "
                                   "CHECKPOINT (a `backmix train` last.pt/best.pt). Split the work with "
                                   "--shard k/N or launch under torchrun; the generation is published when "
                                   "all N shards are built, and a finished shard is not recomputed.")
    b.add_argument("--data", type=Path, required=True, help="image folder (train split) with index.csv")
    b.add_argument("--checkpoint", type=Path, required=True, help="model checkpoint")
    b.add_argument("--cache", type=Path, required=True, help="cache folder (created at generation 0 if absent)")
    add_options(b, ("grid",), defaults={"grid": None},
                said={"grid": f"an existing cache's, else {default_of(f'{INIT}.grid')}"})
    b.add_argument("--keep", type=int, default=3, help="generations kept on disk (new cache)")
    # the CAMs are taken on these canvases; a cache of the other canvas mode is refused
    add_options(b, ("canvas", "canvas_mode"), defaults={"canvas": None, "canvas_mode": None},
                said={"canvas": f"the checkpoint's config, else {CANVAS_WITHOUT_CONFIG}",
                      "canvas_mode": "the checkpoint's config; center without a config"})
    b.add_argument("--momentum", type=float, default=0.1, help="share of the new CAM")
    b.add_argument("--known", default=None, metavar="SPLIT",
                   help="the model's classes: a split number (0..4) or a comma list of class names; rows of "
                        "other classes keep their maps (default: the checkpoint's known_classes, else all)")
    add_options(b, ("batch_size", "workers"), defaults={"batch_size": 128, "workers": 2})   # a pass of forwards, not training batches
    b.add_argument("--shard", default=None, metavar="k/N",
                   help="build shard k of N (default: torchrun's RANK/WORLD_SIZE, else 0/1)")
    add_options(b, ("device",))
    b.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    b.set_defaults(func=run_build)

    i = sub.add_parser("info", help="generation, rows, grid, digests and size of a cache", formatter_class=FMT)
    i.add_argument("--cache", type=Path, required=True, help="cache folder")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.set_defaults(func=run_info)


def parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        from .ranks import launched_as
        rank, world, _ = launched_as()
        return rank, world
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

    from backmix.models import load_model
    from backmix.osr_data.file_digest import file_digest
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
    if config and "canvas_mode" not in config and not args.canvas_mode:
        raise BackMixError(f"checkpoint {args.checkpoint} was written by an earlier backmix (its config has no "
                           "canvas_mode): give --canvas-mode, or `backmix train` writes a checkpoint of this one")
    canvas_mode = args.canvas_mode or saved_value(config, "canvas_mode", "center", args.checkpoint)
    canvas = args.canvas or saved_value(config, "canvas", CANVAS_WITHOUT_CONFIG, args.checkpoint)
    if args.grid is None and (args.cache / "CURRENT").is_file():
        ForegroundCache(args.cache, index=index)           # an existing cache keeps its grid
    else:
        init_cache(args.cache, index, grid=args.grid or default_of(f"{INIT}.grid"), keep=args.keep, canvas_mode=canvas_mode)
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
