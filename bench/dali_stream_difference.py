"""How far the DALI region graph's crops are from the reference loader's, on photographs: the figures
tests/test_dali.py writes its bounds from. ``python -m backmix.bench.dali_stream_difference [--photos N]``
prints, per case (augment, canvas mode) and stream (clean, mixed), the mean difference in grey levels,
the worst crop's mean and the worst pixel (canvas 256, crop 224, random foreground maps)."""
from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch

CASES = (("crop", "center"), ("crop", "stretch"), ("rrc", "center"), ("rrc", "stretch"), ("image", "stretch"))


def stream_difference(folder, augment: str, canvas_mode: str, maps) -> dict[str, tuple[float, float, float]]:
    """{"images"|"mixed": (mean, worst crop's mean, worst pixel)} in grey levels, over one epoch."""
    from backmix.osr_data import ImageIndex
    from backmix.pipeline import LoaderConfig, ReferenceLoader
    from backmix.pipeline.dali import DaliLoader

    index = ImageIndex.load(folder)
    kw = dict(batch_size=16, canvas=256, crop=224, canvas_mode=canvas_mode, seed=1, device="cpu",
              augment="rrc" if augment == "image" else augment, crop_from="image" if augment == "image" else "canvas")
    cfg = LoaderConfig(num_workers=1, keep_canvas=False, **kw)   # the region graph
    ref = list(ReferenceLoader(index, LoaderConfig(num_workers=0, **kw), maps))
    got = list(DaliLoader(index, cfg, maps))
    grey = 255 * torch.tensor(cfg.std).view(1, 3, 1, 1)
    out = {}
    for name in ("images", "mixed"):
        diff = torch.cat([(getattr(g, name) - getattr(r, name)).abs() * grey for g, r in zip(got, ref)])
        out[name] = (float(diff.mean()), float(diff.flatten(1).mean(1).max()), float(diff.max()))
    return out


def main(argv=None) -> int:
    from backmix.bench.folders import make_bench_folder
    from backmix.cam_cache import ArrayMaps

    p = argparse.ArgumentParser(prog="python -m backmix.bench.dali_stream_difference", description=__doc__.split("\n\n")[0])
    p.add_argument("--photos", type=int, default=64, help="bench photographs (500 x 375 JPEGs) to compare on")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        make_bench_folder(tmp, n=args.photos, seed=0)
        maps = ArrayMaps(np.random.default_rng(4).random((args.photos, 8, 8), dtype=np.float32))
        print("| augment | canvas | stream | mean | worst crop | worst pixel |\n|---|---|---|---:|---:|---:|")
        for augment, mode in CASES:
            for name, (mean, crop, pixel) in stream_difference(tmp, augment, mode, maps).items():
                print(f"| {augment} | {mode} | {name} | {mean:.2f} | {crop:.2f} | {pixel:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
