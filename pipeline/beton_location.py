"""Where an image folder's FFCV betons live, and what they are named: never inside the folder.

A beton inside the image folder would be a class folder to torchvision's ``ImageFolder``
(and to any tool that lists class folders), so the default place is a folder beside it,
``PARENT/.backmix-betons/`` (``DATA/.backmix-betons/`` for ``DATA/train`` and
``DATA/test``), or, when that cannot be written, the user's cache
(``$XDG_CACHE_HOME/backmix/betons``, by default ``~/.cache/backmix/betons``). The name
holds the data set's fingerprint, the canvas (size and mode) and the storage: "raw"
pixels (the default: at the canvas size they are the reference loader's canvases, so
the FFCV stream equals the reference one bit for bit) or JPEG at a quality ("jpg90":
smaller, but the stream differs by the JPEG loss).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from backmix._fs import writable_folder
from backmix.osr_data.errors import BackMixError
from backmix.osr_data.index import ImageIndex

STORAGES = ("raw", "jpg")   # how a beton holds its pixels: decoded, or as JPEGs
DEFAULT_STORAGE = "raw"
DEFAULT_QUALITY = 90
SIBLING = ".backmix-betons"


def check_storage(storage: str, jpeg_quality: int) -> None:
    if storage not in STORAGES:
        raise BackMixError(f"beton mode must be one of {', '.join(STORAGES)}, got {storage!r}")
    if not (isinstance(jpeg_quality, int) and 1 <= jpeg_quality <= 100):
        raise BackMixError(f"--jpeg-quality must lie in 1..100, got {jpeg_quality}")


def beton_name(index: ImageIndex, canvas: Optional[int], storage: str = DEFAULT_STORAGE,
               max_resolution: Optional[int] = None, canvas_mode: str = "center",
               jpeg_quality: int = DEFAULT_QUALITY) -> str:
    size = f"{canvas}-{canvas_mode}" if canvas else (f"max{max_resolution}" if max_resolution else "full")
    pixels = f"jpg{jpeg_quality}" if storage == "jpg" else storage
    return f"ffcv-{index.fingerprint()[:12]}-{size}-{pixels}.beton"


def user_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "backmix" / "betons"


def beton_locations(index: ImageIndex, canvas: Optional[int], storage: str = DEFAULT_STORAGE,
                    max_resolution: Optional[int] = None, canvas_mode: str = "center",
                    jpeg_quality: int = DEFAULT_QUALITY) -> tuple[Path, Path]:
    """Where the beton of ``index`` lives by default, in the order looked at: beside the image folder,
    then in the user's cache."""
    name = beton_name(index, canvas, storage, max_resolution, canvas_mode, jpeg_quality)
    return index.root.parent / SIBLING / name, user_cache() / name


def default_destination(index: ImageIndex, canvas: Optional[int], **options) -> Path:
    """Where ``write-beton`` puts a beton by default: beside the folder when the folder's parent takes
    files, else the user's cache."""
    beside, cached = beton_locations(index, canvas, **options)
    folder = beside.parent if beside.parent.is_dir() else index.root.parent
    return beside if writable_folder(folder) else cached


def write_command(data: str | os.PathLike, canvas: int, canvas_mode: str, storage: str, jpeg_quality: int,
                  whole_images: bool = False) -> str:
    """The command that writes the beton; ``whole_images``: one with each image's file (--crop-from image)."""
    jpg = f" --mode jpg --jpeg-quality {jpeg_quality}" if storage == "jpg" else ""
    whole = " --whole-images" if whole_images else ""
    return f"backmix data write-beton --data {data} --canvas {canvas} --canvas-mode {canvas_mode}{jpg}{whole}"


def _describe(canvas: int, canvas_mode: str, storage: str, jpeg_quality: int) -> str:
    return f"canvas {canvas} ({canvas_mode}, {f'jpg {jpeg_quality}' if storage == 'jpg' else storage})"


def find_beton(index: ImageIndex, canvas: int, canvas_mode: str = "center", storage: str = DEFAULT_STORAGE,
               jpeg_quality: int = DEFAULT_QUALITY, whole_images: bool = False) -> Path:
    """The default beton the FFCV loader reads for ``index`` at ``canvas``; says the command when none exists."""
    check_storage(storage, jpeg_quality)
    places = beton_locations(index, canvas, storage, canvas_mode=canvas_mode, jpeg_quality=jpeg_quality)
    for path in places:
        if path.exists():
            return path
    raise BackMixError(f"no FFCV beton of {index.root} at {_describe(canvas, canvas_mode, storage, jpeg_quality)} "
                       f"(looked in {places[0].parent} and {places[1].parent}): write it once with "
                       f"`{write_command(index.root, canvas, canvas_mode, storage, jpeg_quality, whole_images)}`")


def require_betons(root: str | os.PathLike, indexes: Sequence[ImageIndex], canvas: int, canvas_mode: str,
                   storage: str = DEFAULT_STORAGE, jpeg_quality: int = DEFAULT_QUALITY,
                   whole_images: bool = False) -> list[Path]:
    """The betons of every folder of a prepared ``root`` a run reads (train and test), looked up before
    any work; the missing ones in one line, with the one command that writes them all (with each image's
    file: ``whole_images``; ``beton.require_image_files`` checks the ones found hold them)."""
    check_storage(storage, jpeg_quality)
    found, missing = [], []
    for index in indexes:
        try:
            found.append(find_beton(index, canvas, canvas_mode, storage, jpeg_quality))
        except BackMixError:
            missing.append(index)
    if missing:
        where = beton_locations(missing[0], canvas, storage, canvas_mode=canvas_mode, jpeg_quality=jpeg_quality)
        raise BackMixError(f"--backend ffcv reads betons written once, and {' and '.join(str(i.root) for i in missing)} "
                           f"{'has' if len(missing) == 1 else 'have'} none at "
                           f"{_describe(canvas, canvas_mode, storage, jpeg_quality)} (looked in {where[0].parent} and "
                           f"{where[1].parent}): write them with "
                           f"`{write_command(root, canvas, canvas_mode, storage, jpeg_quality, whole_images)}`")
    return found
