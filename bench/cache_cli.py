"""``backmix bench cache``'s options, apart from ``cache.py`` so that its ``--help`` imports no torch."""
from __future__ import annotations

from pathlib import Path

from backmix.cam_cache.cli import FMT
from backmix.osr_data.errors import BackMixError


def register_bench(sub) -> None:
    p = sub.add_parser("cache", help="precompute vs inference throughput, publish time/size, gather latency",
                       formatter_class=FMT)
    p.add_argument("--rows", type=int, default=1_281_167, help="rows of the synthetic cache (ImageNet-1k train)")
    p.add_argument("--grid", type=int, default=8, help="g of the g x g maps")
    p.add_argument("--arch", default="resnet18",
                   help="model timed for precompute vs plain inference (any --arch of backmix train)")
    p.add_argument("--canvas", "--image-size", dest="canvas", type=int, default=112,
                   help="canvas side of the timed batches")
    p.add_argument("--batch-size", type=int, default=256, help="images per timed forward pass")
    p.add_argument("--repeats", type=int, default=7, help="timed batches of each path (median)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: the GPU when there is one")
    p.add_argument("--loop-images", type=int, default=1024,
                   help="bench photos of the in-loop rebuild vs separate pass figure (0: skip it)")
    p.add_argument("--workers", type=int, default=2, help="decoding worker processes of the separate pass")
    p.add_argument("--dir", type=Path, default=None, help="where to write the synthetic cache (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.set_defaults(func=run_bench)


def run_bench(args) -> int:
    from .cache import bench_cache
    if args.loop_images < 0 or args.workers < 0 or args.repeats < 1:
        raise BackMixError("--loop-images and --workers must be >= 0 and --repeats >= 1")
    bench_cache(args)
    return 0
