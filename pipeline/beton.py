"""``backmix data write-beton``: an image folder as an FFCV .beton, once, for many trainings.

Each sample holds the image, its label, its dataset index (the row of the
index file) and the canvas mode it was stored in. With ``--canvas S`` every image is
stored as the S x S canvas of ``--canvas-mode`` (what the FFCV loader with ``--canvas S``
and that mode reads as is, and writes itself on first use; a loader of the other mode
refuses it); without it, at its own size with the longer side capped
at ``--max-resolution``, and the loader resizes it to its canvas. "jpg" mode
stores JPEGs (small; FFCV decodes them), "raw" mode the decoded pixels (large;
at the canvas size they are the reference loader's canvases exactly). The file
is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from backmix.osr_data.decode import CANVAS_MODES, check_canvas_mode, decode_canvas, decode_rgb, to_numpy_hwc
from backmix.osr_data.errors import BackMixError
from backmix.osr_data.index import ImageIndex, atomic_file

INSTALL_HINT = ("FFCV is not installed: pip install 'backmix[ffcv]' (needs apt libopencv-dev "
                "libturbojpeg0-dev pkg-config; scripts/install.sh does both)")
MODES = ("jpg", "raw")
DEFAULT_CANVAS = 40   # LoaderConfig's
NOT_A_CANVAS = -1     # the canvas_mode field of images stored at their own size (any loader resizes them)


def require_ffcv() -> None:
    try:
        import ffcv  # noqa: F401
        from ffcv.loader import Loader  # noqa: F401
    except ImportError:
        raise BackMixError(INSTALL_HINT) from None


def default_beton_path(index: ImageIndex, canvas: Optional[int], mode: str = "jpg",
                       max_resolution: Optional[int] = None, canvas_mode: str = "center") -> Path:
    """Where the loader looks for (canvas given) or a user keeps (no canvas) the beton of ``index``."""
    size = f"{canvas}-{canvas_mode}" if canvas else (f"max{max_resolution}" if max_resolution else "full")
    return index.root / ".backmix" / f"ffcv-{index.fingerprint()[:12]}-{size}-{mode}.beton"


class _Samples:
    """What FFCV's writer processes read: (HWC uint8 image, label, dataset index) per row.

    A row that fails comes back as a 1x1 blank with index -1 - row: FFCV's writer waits
    forever for a worker that raised, so the failure is reported after the write instead.
    """

    def __init__(self, index: ImageIndex, canvas: Optional[int], canvas_mode: str) -> None:
        self.index, self.canvas, self.canvas_mode = index, canvas, canvas_mode
        self.mode_code = CANVAS_MODES.index(canvas_mode) if canvas else NOT_A_CANVAS

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        path = self.index.abspath(i)
        try:
            image = decode_canvas(path, self.canvas, self.canvas_mode) if self.canvas else decode_rgb(path)
            return to_numpy_hwc(image), int(self.index.labels[i]), i, self.mode_code
        except Exception:  # noqa: BLE001 -- see the class docstring
            return np.zeros((1, 1, 3), np.uint8), -1, -1 - i, self.mode_code


@contextlib.contextmanager
def _ffcv_progress(show: bool):
    """FFCV's writer always draws a tqdm bar; hide it when asked (module-level name, restored after)."""
    import ffcv.writer as writer
    original = writer.tqdm
    if not show:
        writer.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        writer.tqdm = original


def write_beton(index: ImageIndex, path: str | os.PathLike, *, canvas: Optional[int] = None,
                max_resolution: Optional[int] = None, mode: str = "jpg", jpeg_quality: int = 90,
                num_workers: int = 2, progress: Optional[bool] = None, canvas_mode: str = "center") -> Path:
    """Write ``index`` to ``path`` (fields image, label, index, canvas_mode). canvas: store every image
    as its canvas x canvas canvas in ``canvas_mode``; else at its own size, the longer side capped at ``max_resolution`` (None:
    as is). progress: None = when stderr is a terminal."""
    require_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader
    from ffcv.writer import DatasetWriter

    check_canvas_mode(canvas_mode)
    if mode not in MODES:
        raise BackMixError(f"--mode must be one of {MODES}, got {mode!r}")
    if not 1 <= jpeg_quality <= 100:
        raise BackMixError(f"--jpeg-quality must lie in 1..100, got {jpeg_quality}")
    if canvas is not None and max_resolution is not None:
        raise BackMixError("give --canvas (store canvases) or --max-resolution (store images), not both")
    for name, value in (("--canvas", canvas), ("--max-resolution", max_resolution)):
        if value is not None and not 1 <= value < 65536:
            raise BackMixError(f"{name} must lie in 1..65535, got {value}")
    if len(index) == 0:
        raise BackMixError(f"{index.root} holds no images to write")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = {"image": RGBImageField(write_mode=mode, max_resolution=canvas or max_resolution,
                                     jpeg_quality=jpeg_quality),
              "label": IntField(), "index": IntField(), "canvas_mode": IntField()}
    show = sys.stderr.isatty() if progress is None else progress
    with atomic_file(path) as tmp, _ffcv_progress(show):
        DatasetWriter(str(tmp), fields, num_workers=max(1, num_workers)).from_indexed_dataset(
            _Samples(index, canvas, canvas_mode))
        failed = np.flatnonzero(Reader(str(tmp)).metadata["f2"] < 0)
        if len(failed):
            raise BackMixError(f"{len(failed)} image(s) do not decode, e.g. {index.abspath(int(failed[0]))}; "
                               "fix or remove them, then index the folder again")
    return path


def register_data(sub) -> None:
    p = sub.add_parser("write-beton", help="convert an image folder to an FFCV .beton",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=__doc__)
    p.add_argument("--data", type=Path, required=True, help="image folder (root/<class>/<image>) or prepared root")
    p.add_argument("--out", type=Path, default=None,
                   help="file to write (default: DATA/.backmix/ffcv-<fingerprint>-<size>-<mode>.beton; "
                        "with --canvas that is where the FFCV loader looks)")
    p.add_argument("--canvas", type=int, default=None,
                   help=f"store every image resized to this square canvas (the loader's --canvas); "
                        f"{DEFAULT_CANVAS} when --max-resolution is not given either")
    p.add_argument("--canvas-mode", choices=CANVAS_MODES, default="center",
                   help="with --canvas: center = shorter side resized, centre square; stretch = both sides "
                        "resized (the loader's --canvas-mode)")
    p.add_argument("--max-resolution", type=int, default=None,
                   help="instead of --canvas: store images at their own size, longer side capped at this")
    p.add_argument("--mode", choices=MODES, default="jpg", help="store JPEGs or raw pixels")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--workers", type=int, default=2, help="processes that decode and encode")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_write_beton)


def run_write_beton(args) -> int:
    data = args.data / "train" if (args.data / "train").is_dir() else args.data
    index = ImageIndex.load(data)
    canvas = args.canvas if args.canvas is not None or args.max_resolution is not None else DEFAULT_CANVAS
    out = args.out or default_beton_path(index, canvas, args.mode, args.max_resolution, args.canvas_mode)
    write_beton(index, out, canvas=canvas, max_resolution=args.max_resolution, mode=args.mode,
                canvas_mode=args.canvas_mode,
                jpeg_quality=args.jpeg_quality, num_workers=args.workers,
                progress=False if args.no_progress else None)
    size = f"{canvas}x{canvas} {args.canvas_mode}" if canvas else f"longer side <= {args.max_resolution or 'any'}"
    print(f"wrote {out} ({len(index)} images, {size}, {args.mode}, {out.stat().st_size / 1e6:.1f} MB)")
    return 0
