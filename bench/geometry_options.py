"""The canvas and crop (and grid) options of the commands that build a loader from their own flags
(``show``, ``bench scale``): written once, with ``LoaderConfig``'s defaults. Torch-free, so that
``--help`` stays fast."""
from __future__ import annotations

import argparse


def add_geometry_options(p: argparse.ArgumentParser, *, grid: bool = False) -> None:
    p.add_argument("--canvas", type=int, default=40, help="side of the square canvas the mix works on")
    p.add_argument("--crop", type=int, default=32, help="side of the random crop the model sees")
    if grid:
        p.add_argument("--grid", type=int, default=8, help="g of the g x g foreground maps")
