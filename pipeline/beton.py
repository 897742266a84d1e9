"""``backmix data write-beton``: an image folder as an FFCV .beton, once, for many trainings.

Each sample holds the image resized to the square canvas (the loader's
``--canvas``, so the stored resolution is the canvas), its label and its
dataset index. "jpg" mode stores JPEGs (small; FFCV decodes them), "raw" mode
the decoded pixels (large; the canvas is then the reference loader's exactly).
The file is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from osr_data.decode import decode_canvas
from osr_data.errors import BackMixError
from osr_data.index import ImageIndex

INSTALL_HINT = ("FFCV is not installed: pip install 'backmix[ffcv]' (it needs apt packages "
                "libopencv-dev libturbojpeg0-dev pkg-config; scripts/install.sh does both)")
MODES = ("jpg", "raw")


def require_ffcv() -> None:
    try:
        import ffcv  # noqa: F401
        from ffcv.loader import Loader  # noqa: F401
    except ImportError:
        raise BackMixError(INSTALL_HINT) from None


def default_beton_path(index: ImageIndex, canvas: int, mode: str = "jpg") -> Path:
    return index.root / ".backmix" / f"ffcv-{index.fingerprint()[:12]}-{canvas}-{mode}.beton"


class _Canvases:
    """What FFCV's writer reads: (HWC uint8 canvas, label, dataset index) per row."""

    def __init__(self, index: ImageIndex, canvas: int) -> None:
        self.index, self.canvas = index, canvas

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        image = decode_canvas(self.index.abspath(i), self.canvas).permute(1, 2, 0).contiguous().numpy()
        return image, int(self.index.labels[i]), i


def write_beton(index: ImageIndex, path: str | os.PathLike, *, canvas: int, mode: str = "jpg",
                jpeg_quality: int = 90, num_workers: int = 2) -> Path:
    require_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    if mode not in MODES:
        raise BackMixError(f"--mode must be one of {MODES}, got {mode!r}")
    if not 1 <= jpeg_quality <= 100:
        raise BackMixError(f"--jpeg-quality must lie in 1..100, got {jpeg_quality}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fields = {"image": RGBImageField(write_mode=mode, max_resolution=canvas, jpeg_quality=jpeg_quality),
              "label": IntField(), "index": IntField()}
    try:
        # FFCV's writer shows its own progress bar.
        DatasetWriter(str(tmp), fields, num_workers=max(1, num_workers)).from_indexed_dataset(_Canvases(index, canvas))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def register_data(sub) -> None:
    p = sub.add_parser("write-beton", help="convert an image folder to an FFCV .beton",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=__doc__)
    p.add_argument("--data", type=Path, required=True, help="image folder (root/<class>/<image>) or prepared root")
    p.add_argument("--out", type=Path, default=None,
                   help="file to write (default: DATA/.backmix/ffcv-<fingerprint>-<canvas>-<mode>.beton, "
                        "where the FFCV loader looks)")
    p.add_argument("--max-resolution", "--canvas", dest="canvas", type=int, default=40,
                   help="side of the square canvas images are stored at (the loader's --canvas)")
    p.add_argument("--mode", choices=MODES, default="jpg", help="store JPEGs or raw pixels")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=run_write_beton)


def run_write_beton(args) -> int:
    data = args.data / "train" if (args.data / "train").is_dir() else args.data
    index = ImageIndex.load(data)
    out = args.out or default_beton_path(index, args.canvas, args.mode)
    write_beton(index, out, canvas=args.canvas, mode=args.mode, jpeg_quality=args.jpeg_quality,
                num_workers=args.workers)
    print(f"wrote {out} ({len(index)} images at {args.canvas}x{args.canvas}, {args.mode}, "
          f"{out.stat().st_size / 1e6:.1f} MB)")
    return 0

