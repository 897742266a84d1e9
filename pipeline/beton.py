"""``backmix data write-beton``: an image folder as an FFCV .beton, once, on purpose, for many trainings.

Each sample holds the image, its label, its dataset index (the row of the index file) and the canvas
mode it was stored in; with ``--whole-images`` also the image's file, its bytes as they are (what a
loader with ``--crop-from image`` decodes whole and cuts its crops from). With ``--canvas S`` every
image is stored as the S x S canvas of ``--canvas-mode`` (what the FFCV loader with ``--canvas S``
and that mode reads as is; a loader of the other mode refuses it); without it, at its own size with
the longer side capped at ``--max-resolution``, and the loader resizes it to its canvas. "raw" mode
(the default) stores the decoded pixels (large; at the canvas size they are the reference loader's
canvases exactly, so the FFCV stream is the reference one), "jpg" mode JPEGs at ``--jpeg-quality``
(small; FFCV decodes them, and the stream differs by the JPEG loss). Where betons go by default
(beside the image folder, never inside it) is ``pipeline/beton_location.py``; ``--data`` a prepared
root writes the betons of its train/ and test/ both.

The loader never writes a beton itself (ImageNet's takes ~17 minutes): this
command does, once. It writes under a temporary name and renames when
complete; a lock file beside the beton keeps a second writer waiting (it then
finds the beton written); under torchrun only rank 0 writes and the other
ranks wait for it. FFCV's writer runs in a child process group
(``pipeline/beton_process.py``), so Ctrl-C or SIGTERM stops it and its worker
processes within seconds and removes the temporary file. Progress is a bar on a
terminal and a line every 5 % in a log. Each file is read as the loaders read it
(``read_canvas``): one missing or changed since the folder was indexed stops the
write with the loaders' one-line error; an image that does not decode fails the
write (``--on-error raise``) or is kept as a marked blank that the loader leaves
out (``--on-error skip``).
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from backmix._fs import atomic_file, check_output_file
from backmix.osr_data.decode import (CANVAS_MODES, DecodeError, check_canvas_mode, decode_rgb_bytes, read_bytes,
                                     read_canvas, to_canvas, to_numpy_hwc)
from backmix.options import DefaultsFormatter, add_options
from backmix.cam_cache.ranks import launched_as
from backmix.osr_data.errors import BackMixError
from backmix.osr_data.filelock import exclusive_lock
from backmix.osr_data.index import ImageIndex

from .beton_location import DEFAULT_QUALITY, DEFAULT_STORAGE, STORAGES, beton_locations, check_storage, default_destination
from .beton_process import StopFile, write_in_child
from .config import ON_ERROR, LoaderConfig

log = logging.getLogger("backmix")

INSTALL_HINT = ("FFCV is not installed: pip install 'backmix[ffcv]' (needs apt libopencv-dev "
                "libturbojpeg0-dev pkg-config; scripts/install.sh does both)")
NOT_A_CANVAS = -1     # the canvas_mode field of images stored at their own size (any loader resizes them)
FILE_FIELD = "file"   # a beton written with --whole-images: each image's file, its bytes as they are


def require_ffcv() -> None:
    try:
        import ffcv  # noqa: F401
        from ffcv.loader import Loader  # noqa: F401
    except ImportError:
        raise BackMixError(INSTALL_HINT) from None


class _Samples:
    """What FFCV's writer processes read: (HWC uint8 image, label, dataset index, canvas mode), and with
    ``whole_images`` the file's bytes, per row; each file read once, as the loaders read it
    (``read_canvas``), so the bytes stored are the bytes the stored image was decoded from.

    FFCV's writer waits forever for a worker that raised, so a row that does not decode comes back
    as a blank (canvas-sized: a canvas beton stays uniform; no file bytes) with index -1 - row, reported
    after the write (and, with ``--on-error skip``, left out by the loader). A file missing or changed since
    indexing stops the write whatever ``--on-error`` says: the worker leaves the loaders' one-line
    error in ``stop_file`` and raises, which ends the write (``write_in_child``).
    """

    def __init__(self, index: ImageIndex, canvas: Optional[int], canvas_mode: str, whole_images: bool = False) -> None:
        self.index, self.canvas, self.canvas_mode, self.whole_images = index, canvas, canvas_mode, whole_images
        self.mode_code = CANVAS_MODES.index(canvas_mode) if canvas else NOT_A_CANVAS
        self.stop_file = StopFile()

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        read = read_canvas(self.index, i, self.canvas, self.canvas_mode, on_error="return", decode=self._decode)
        if isinstance(read, DecodeError):
            side = self.canvas or 1
            blank = np.zeros((side, side, 3), np.uint8), -1, -1 - i, self.mode_code
            # One byte, not none: FFCV gives an empty allocation the next one's address, which would then
            # be read as empty.
            return (*blank, np.zeros(1, np.uint8)) if self.whole_images else blank
        if isinstance(read, BackMixError):
            self.stop_file.say(str(read))
            raise read
        image, data = read
        sample = to_numpy_hwc(image), int(self.index.labels[i]), i, self.mode_code
        return (*sample, data.numpy()) if self.whole_images else sample

    def _decode(self, path: str, size: Optional[int], mode: str):
        """(the image to store: its canvas, or the whole image when stored at its own size (FFCV caps the
        longer side), the file's bytes)."""
        data = read_bytes(path)
        image = decode_rgb_bytes(data, path)
        return (to_canvas(image, size, mode) if size else image), data


def require_image_files(betons: list[Path], rewrite: str) -> None:
    """Betons read with crops cut from the image: each must hold the image files (``--whole-images``);
    else one line naming the first without them and ``rewrite``, the command that writes them."""
    require_ffcv()
    from ffcv.reader import Reader
    for path in betons:
        try:
            fields = Reader(str(path)).handlers
        except (ValueError, KeyError, AssertionError, OSError) as e:
            raise BackMixError(f"{path} is not a backmix beton ({e})") from None
        if FILE_FIELD not in fields:
            raise BackMixError(f"--crop-from image reads the image files a beton holds, and {path} holds none: "
                               f"rewrite the betons with `{rewrite}`")


def skipped_rows(stored_index: np.ndarray) -> np.ndarray:
    """Dataset rows a beton holds as marked blanks (images that did not decode), from its index field."""
    return (-1 - stored_index[stored_index < 0]).astype(np.int64)


def _wait_for(path: Path, poll_s: float = 1.0) -> None:
    """Another rank writes ``path``: wait until it exists and its writer let go of the lock."""
    log.info("rank %d: waiting for rank 0 to write %s", launched_as()[0], path)
    while not path.exists():
        time.sleep(poll_s)
    with exclusive_lock(path):
        pass


class BetonWrite(NamedTuple):
    """What ``write_beton`` did: the file, whether this process wrote it (not: found it written, by
    another process or rank), and the files it stored as marked blanks (``on_error="skip"``)."""
    path: Path
    written: bool
    skipped: list[str]


def write_beton(index: ImageIndex, path: str | os.PathLike, *, canvas: Optional[int] = None,
                max_resolution: Optional[int] = None, storage: str = DEFAULT_STORAGE, jpeg_quality: int = DEFAULT_QUALITY,
                num_workers: int = 2, progress: Optional[bool] = None, canvas_mode: str = "center",
                on_error: str = "raise", force: bool = False, whole_images: bool = False) -> BetonWrite:
    """Write ``index`` to ``path`` (fields image, label, index, canvas_mode; and file, with ``whole_images``).

    canvas: store every image as its canvas x canvas canvas in ``canvas_mode``; else at its own
    size, the longer side capped at ``max_resolution`` (None: as is). progress: None = a bar on a
    terminal, lines otherwise. on_error "skip": images that do not decode are stored as marked
    blanks (the loader leaves them out) and named in the result. force False: a beton already at
    ``path`` is kept (a second writer, having waited for the first, finds it there). whole_images: also
    each image's file, its bytes (``FILE_FIELD``), for loaders that cut crops from the whole image.
    Under torchrun (RANK > 0) this process only waits for rank 0's beton.
    """
    require_ffcv()
    from ffcv.fields import BytesField, IntField, RGBImageField
    from ffcv.reader import Reader

    check_canvas_mode(canvas_mode)
    check_storage(storage, jpeg_quality)
    if on_error not in ON_ERROR:
        raise BackMixError(f"--on-error must be one of {ON_ERROR}, got {on_error!r}")
    if canvas is not None and max_resolution is not None:
        raise BackMixError("give --canvas (store canvases) or --max-resolution (store images), not both")
    for name, value in (("--canvas", canvas), ("--max-resolution", max_resolution)):
        if value is not None and not 1 <= value < 65536:
            raise BackMixError(f"{name} must lie in 1..65535, got {value}")
    if len(index) == 0:
        raise BackMixError(f"{index.root} holds no images to write")
    path = check_output_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if launched_as()[0] > 0:
        _wait_for(path)
        return BetonWrite(path, False, [])
    fields = {"image": RGBImageField(write_mode=storage, max_resolution=canvas or max_resolution,
                                     jpeg_quality=jpeg_quality),
              "label": IntField(), "index": IntField(), "canvas_mode": IntField(),
              **({FILE_FIELD: BytesField()} if whole_images else {})}
    with exclusive_lock(path):
        if path.exists() and not force:
            return BetonWrite(path, False, [])
        with atomic_file(path) as tmp:
            write_in_child(tmp, _Samples(index, canvas, canvas_mode, whole_images), fields, num_workers, progress,
                            f"writing {path.name}")
            failed = skipped_rows(Reader(str(tmp)).metadata["f2"])
            if len(failed) and on_error == "raise":
                # The first file's own error, as every loader raises it, with how many more there are.
                first = read_canvas(index, int(failed[0]), canvas or 8, canvas_mode, on_error="return")
                why = first.why if isinstance(first, DecodeError) else str(first)
                raise DecodeError(index.abspath(int(failed[0])),
                                  f"{why}; {len(failed)} image(s) do not decode: fix or remove them and index "
                                  "the folder again, or pass --on-error skip")
    skipped = [index.abspath(int(i)) for i in failed]
    for name in skipped:
        log.warning("skipped %s: it does not decode", name)
    return BetonWrite(path, True, skipped)


def register_data(sub) -> None:
    p = sub.add_parser("write-beton", help="convert an image folder to an FFCV .beton (once, for the FFCV loader)",
                       formatter_class=DefaultsFormatter, description=__doc__)
    p.add_argument("--data", type=Path, required=True,
                   help="image folder (root/<class>/<image>), or a prepared root: its train/ and test/ both")
    p.add_argument("--out", type=Path, default=None,
                   help="file to write, for one image folder (default: PARENT/.backmix-betons/ffcv-<fingerprint>-"
                        "<size>-<mode>.beton beside the image folder, or the same name under ~/.cache/backmix/betons "
                        "when PARENT is read-only; with --canvas both are where the FFCV loader looks)")
    # every image is stored on the canvas the loader will read (or at its own size: --max-resolution)
    add_options(p, ("canvas",), defaults={"canvas": None},
                said={"canvas": f"{LoaderConfig.canvas} when --max-resolution is not given either"})
    add_options(p, ("canvas_mode",))
    p.add_argument("--max-resolution", type=int, default=None,
                   help="instead of --canvas: store images at their own size, longer side capped at this")
    p.add_argument("--mode", dest="storage", choices=STORAGES, default=DEFAULT_STORAGE,
                   help="raw = decoded pixels (the FFCV stream equals the reference loader's); jpg = JPEGs at "
                        "--jpeg-quality (smaller; the stream differs by the JPEG loss; train with --beton-mode jpg)")
    # Not given: DEFAULT_QUALITY under --mode jpg (SUPPRESS: a quality given with raw storage is refused)
    p.add_argument("--jpeg-quality", type=int, default=argparse.SUPPRESS,
                   help=f"--mode jpg only: JPEG quality, 1..100 (default: {DEFAULT_QUALITY})")
    # --on-error skip stores a marked blank the loader leaves out; a file missing or changed since
    # indexing always fails
    add_options(p, ("workers", "on_error"))
    p.add_argument("--whole-images", action="store_true",
                   help="also store each image's file as it is (its bytes), which the FFCV loader decodes whole to "
                        "cut crops from the image (--crop-from image)")
    p.add_argument("--force", action="store_true", help="rewrite the beton if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_write_beton)


def image_folders(data: Path) -> list[Path]:
    """The image folders ``--data`` names: a prepared root's train/ and test/ (those it has), or itself."""
    folders = [data / split for split in ("train", "test") if (data / split).is_dir()]
    return folders if (data / "train").is_dir() else [data]


def run_write_beton(args) -> int:
    folders = image_folders(args.data)
    if args.out is not None:
        if len(folders) > 1:
            raise BackMixError(f"--out names one beton, and {args.data} holds {len(folders)} image folders: "
                               f"leave --out out, or pass --data {folders[0]}")
        check_output_file(args.out)        # before indexing: a bad destination fails at once
    canvas = args.canvas if args.canvas is not None or args.max_resolution is not None else LoaderConfig.canvas
    if hasattr(args, "jpeg_quality") and args.storage != "jpg":
        raise BackMixError(f"--jpeg-quality is for --mode jpg; --mode {args.storage} stores decoded pixels: add "
                           "--mode jpg or leave --jpeg-quality out")
    args.jpeg_quality = getattr(args, "jpeg_quality", DEFAULT_QUALITY)
    check_storage(args.storage, args.jpeg_quality)
    for folder in folders:
        _write_one(args, ImageIndex.load(folder), canvas)
    return 0


def _write_one(args, index: ImageIndex, canvas: Optional[int]) -> None:
    out = args.out
    if out is None:
        where = dict(storage=args.storage, max_resolution=args.max_resolution, canvas_mode=args.canvas_mode,
                       jpeg_quality=args.jpeg_quality)
        out = default_destination(index, canvas, **where)
        if out == beton_locations(index, canvas, **where)[1]:
            log.info("%s is read-only: writing the beton to %s (the FFCV loader looks there too)",
                     index.root.parent, out)
    done = write_beton(index, out, canvas=canvas, max_resolution=args.max_resolution, storage=args.storage,
                       canvas_mode=args.canvas_mode, jpeg_quality=args.jpeg_quality, num_workers=args.workers,
                       progress=False if args.no_progress else None, on_error=args.on_error, force=args.force,
                       whole_images=args.whole_images)
    if not done.written:
        print(f"already written: {out} (--force rewrites it)")
        return
    skipped = done.skipped
    size = f"{canvas}x{canvas} {args.canvas_mode}" if canvas else f"longer side <= {args.max_resolution or 'any'}"
    extra = (f", {len(skipped)} skipped" if skipped else "") + (", with their files" if args.whole_images else "")
    storage = f"jpg {args.jpeg_quality}" if args.storage == "jpg" else args.storage
    print(f"wrote {out} ({len(index) - len(skipped)} images{extra}, {size}, {storage}, "
          f"{out.stat().st_size / 1e6:.1f} MB)")
