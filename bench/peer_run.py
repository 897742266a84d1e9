"""One measurement of ``backmix bench peers``, in the fresh process it runs in:
``python -m backmix.bench.peer_run --family F --loader L [--mode M] ...``.

Builds one loader (a family's stock loader, ``peer_loaders``, or a backmix backend with BackMix off, on
or on + clean, ``--augment rrc``), times ``--batches`` batches after ``--warmup`` with the loader
benchmark's ``time_loader`` (epochs roll over as needed) and prints one JSON line: images/s and the
median batch time. A fresh process per measurement means no loader inherits another's threads, worker
processes, compiled kernels or page-cache warmth it made itself. Bad input: one ``backmix: error:`` line
and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

FAMILIES = ("torch", "ffcv", "dali")
# family -> backmix's backends of that family
FAMILY_BACKENDS = {"torch": ("reference", "torchvision"), "ffcv": ("ffcv",), "dali": ("dali",)}


def build(args, device):
    """The loader ``args`` names, on ``device`` (a torch.device)."""
    from backmix.osr_data.errors import BackMixError

    if args.loader == "stock":
        from . import peer_loaders
        shape = {"batch_size": args.batch_size, "workers": args.workers, "crop": args.crop, "device": device}
        if args.family == "ffcv":
            return peer_loaders.ffcv_stock(args.beton, **shape)
        return getattr(peer_loaders, f"{args.family}_stock")(args.data, **shape)
    if args.loader not in FAMILY_BACKENDS[args.family]:
        raise BackMixError(f"{args.loader} is not a backend of the {args.family} family")
    from backmix.cam_cache.maps import UniformMaps
    from backmix.osr_data.index import ImageIndex

    from .loader import MODES
    from backmix.pipeline.config import LoaderConfig
    from backmix.pipeline.loaders import make_loader

    backmix, clean = MODES[args.mode]
    config = LoaderConfig(batch_size=args.batch_size, canvas=args.canvas, crop=args.crop, augment="rrc",
                          backmix=backmix, clean=clean, num_workers=args.workers, device=device.type,
                          last_batch="drop",
                          # The stream a training epoch without an in-loop rebuild reads: crops only, as
                          # the stock loaders give (the canvas is carried only when a rebuild reads it).
                          keep_canvas=False)
    index = ImageIndex.load(args.data)
    return make_loader(args.loader, index, config, UniformMaps(len(index), config.grid),
                       **({"beton": args.beton} if args.loader == "ffcv" else {}))


def measure(args) -> dict:
    from .loader import time_loader
    from .stages import sync
    from backmix.pipeline.config import choose_device

    device = choose_device(args.device)
    loader = build(args, device)
    times = time_loader(loader, args.warmup, args.batches, lambda: sync(device))
    getattr(loader, "close", lambda: None)()
    return {"images_per_s": args.batch_size * len(times) / sum(times),
            "batch_ms_median": 1e3 * statistics.median(times), "batches": len(times)}


def parser() -> argparse.ArgumentParser:
    from .loader import MODES
    p = argparse.ArgumentParser(prog="python -m backmix.bench.peer_run", description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=FAMILIES, required=True)
    p.add_argument("--loader", required=True, help="stock, or a backmix backend of the family")
    p.add_argument("--mode", choices=tuple(MODES), default="off", help="backmix loaders: BackMix off, on, on+clean")
    p.add_argument("--data", type=Path, required=True, help="the image folder (an indexed ImageFolder)")
    p.add_argument("--beton", type=Path, default=None, help="FFCV loaders: the beton to read")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--canvas", type=int, default=256, help="backmix loaders: the canvas the crop is taken from")
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batches", type=int, default=20, help="timed batches")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    return p


def main(argv=None) -> int:
    from backmix.osr_data.errors import BackMixError

    args = parser().parse_args(argv)
    try:
        result = measure(args)
    except BackMixError as e:
        print(f"backmix: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    status = main()
    sys.stderr.flush()
    # Done: no wait on a loader's threads or workers to wind down (FFCV's and DALI's may linger).
    os._exit(status)
