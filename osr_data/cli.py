"""``backmix data prepare``."""
from __future__ import annotations

import argparse
from pathlib import Path

from .prepare import DATASETS, prepare


def register(sub) -> None:
    p = sub.add_parser("prepare", help="write a bundled real data set as an image folder",
                       description="Write a bundled data set to OUT in the ImageNet layout: "
                                   "OUT/train/<class>/<image>.png and OUT/test/..., each with index.csv.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("data/digits"), help="folder to write")
    p.add_argument("--dataset", choices=sorted(DATASETS), default="digits",
                   help="digits: scikit-learn's handwritten digits; digits-on-photos: the digits "
                        "composited on crops of bundled photographs with a class-background prior; "
                        "digits-on-photos-p80: the same with the prior fixed at 0.8; photo-crops: the "
                        "photographs alone, no digit (a set of unknowns for `backmix train --open-test OUT/test`)")
    p.add_argument("--prior", type=float, default=0.5,
                   help="digits-on-photos: share of a known class's training images on its own photograph")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run_prepare)


def run_prepare(args) -> int:
    kwargs = {"seed": args.seed}
    if args.dataset == "digits-on-photos":
        kwargs["prior"] = args.prior
    written = prepare(args.dataset, args.out, force=args.force, **kwargs)
    from .index import ImageIndex
    tr, te = ImageIndex.load(args.out / "train"), ImageIndex.load(args.out / "test")
    state = "wrote" if written else "already prepared:"
    print(f"{state} {args.out} ({len(tr)} train, {len(te)} test images, {tr.num_classes} classes)")
    return 0
