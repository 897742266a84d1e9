"""``backmix bench cache``'s options, apart from ``cache.py`` so that its ``--help`` imports no torch."""
from __future__ import annotations

from pathlib import Path

from backmix.cam_cache.cli import FMT, INIT
from backmix.options import add_option, add_options, default_of
from backmix.osr_data.errors import BackMixError


def register_bench(sub) -> None:
    p = sub.add_parser("cache", help="precompute vs inference throughput, publish time/size, gather latency",
                       formatter_class=FMT)
    p.add_argument("--rows", type=int, default=1_281_167, help="rows of the synthetic cache (ImageNet-1k train)")
    add_options(p, ("grid",), defaults={"grid": default_of(f"{INIT}.grid")})
    p.add_argument("--arch", default="resnet18",
                   help="model timed for precompute vs plain inference (any --arch of backmix train)")
    add_option(p, "canvas", 112, aliases=("--image-size",))   # of the timed batches
    add_options(p, ("batch_size",), defaults={"batch_size": 256})   # of the timed forward passes
    p.add_argument("--repeats", type=int, default=7, help="timed batches of each path (median)")
    add_options(p, ("device",))
    p.add_argument("--loop-images", type=int, default=1024,
                   help="bench photos of the in-loop rebuild vs separate pass figure (0: skip it)")
    add_options(p, ("workers",), defaults={"workers": 2})   # of the separate pass (LoaderConfig would import torch)
    p.add_argument("--dir", type=Path, default=None, help="where to write the synthetic cache (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.set_defaults(func=run_bench)


def run_bench(args) -> int:
    from .cache import bench_cache
    if args.loop_images < 0 or args.workers < 0 or args.repeats < 1:
        raise BackMixError("--loop-images and --workers must be >= 0 and --repeats >= 1")
    bench_cache(args)
    return 0
