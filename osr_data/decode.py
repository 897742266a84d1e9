"""Decoding and the square canvas, the shared first step of every loader."""
from __future__ import annotations

import io
import warnings
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2 import functional as TF

from .errors import BackMixError
from .limits import MAX_IMAGE_ASPECT, MAX_IMAGE_PIXELS
from .normalize import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401  (the peer benchmarks import them from here)

# torchvision 0.29 marks its libjpeg-turbo/libpng decoders deprecated in favour of
# torchcodec; they remain the fastest CPU decoders installed here, so keep them quiet.
warnings.filterwarnings("ignore", message="The image decoding and encoding", category=DeprecationWarning)


class DecodeError(BackMixError):
    def __init__(self, path: str, why: str = "") -> None:
        super().__init__(f"image {path} does not decode" + (f": {why}" if why else ""))
        self.path, self.why = path, why

    def __reduce__(self):
        # Pickled from a worker to the loader: rebuilt from (path, why), not from the message.
        return DecodeError, (self.path, self.why)


def jpeg_size(data) -> Optional[tuple[int, int]]:
    """(height, width) of a JPEG as stored (EXIF orientation not applied), from its frame header, read
    directly (a microsecond; PIL's parse of the whole header takes fifty); None when ``data`` (bytes-like)
    is not a JPEG or its header is cut short."""
    b = memoryview(data).cast("B")
    n = len(b)
    if n < 4 or b[0] != 0xFF or b[1] != 0xD8:
        return None
    i = 2
    while i + 9 < n:
        if b[i] != 0xFF:
            return None
        marker = b[i + 1]
        if marker == 0xFF:   # fill byte
            i += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):   # a start of frame (not DHT, JPG, DAC)
            return (b[i + 5] << 8) | b[i + 6], (b[i + 7] << 8) | b[i + 8]
        i += 2 + ((b[i + 2] << 8) | b[i + 3])
    return None


def check_pixels(path: str, data) -> Optional[tuple[int, int]]:
    """Refuses, from the header alone, an image of more than ``MAX_IMAGE_PIXELS`` pixels or whose sides
    differ by more than ``MAX_IMAGE_ASPECT`` times (the canvas resize of a 900000 x 1 image would need
    gigabytes); a ``DecodeError``, so ``--on-error skip`` skips it. Returns the (height, width) the header
    gives as stored, None when it gives none (not an image PIL knows: the decoder says what is wrong)."""
    size = jpeg_size(data)
    if size is not None:
        height, width = size
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(memoryview(data).cast("B"))) as im:
                    width, height = im.size
        except Image.DecompressionBombError:   # over twice PIL's own limit
            width = height = None
        except Exception:
            return None
    limit = MAX_IMAGE_PIXELS.value()
    if width is None or width * height > limit:
        size = f"{width}x{height} pixels" if width else "a decompression bomb"
        raise DecodeError(path, f"{size} is over the limit of {limit} ({MAX_IMAGE_PIXELS.env})")
    aspect = MAX_IMAGE_ASPECT.value()
    if max(width, height) > aspect * max(min(width, height), 1):
        raise DecodeError(path, f"{width}x{height} pixels: one side is over {aspect} times the other "
                                f"({MAX_IMAGE_ASPECT.env})")
    return height, width


def _why(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else ""


def read_bytes(path: str) -> torch.Tensor:
    """The file's bytes, uint8 [N]; ``DecodeError`` if it cannot be read."""
    try:
        return read_file(path)
    except (RuntimeError, ValueError, OSError) as e:
        raise DecodeError(path, _why(e)) from None


def decode_rgb(path: str) -> torch.Tensor:
    """uint8 [3, H, W]; grey and palette images become RGB, 16-bit PNGs 8-bit. EXIF orientation is not
    applied (as torchvision's and PIL's readers do not): pixels are as stored. BMP, which torchvision
    does not decode, goes through PIL."""
    return decode_rgb_bytes(read_bytes(path), path)


def decode_rgb_bytes(data: torch.Tensor, path: str) -> torch.Tensor:
    """``decode_rgb`` of a file's bytes already read (uint8 [N]); ``path`` names it in an error."""
    try:
        check_pixels(path, data.numpy())
        if data[:2].tolist() == [66, 77]:   # "BM"
            with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
                # np.array copies: torch warns on every read-only array PIL's buffer gives
                image = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()
        else:
            image = decode_image(data, mode=ImageReadMode.RGB)
            if image.ndim == 4:   # an animated GIF (whatever its suffix) is its frames: the first one
                image = image[0]
    except (RuntimeError, ValueError, OSError) as e:
        raise DecodeError(path, _why(e)) from None
    if image.dtype == torch.uint16:
        # round(v * 255 / 65535) = round(v / 257), in integers: (v + 128) // 257.
        image = ((image.to(torch.int32) + 128) // 257).to(torch.uint8)
    return image


from .options import CANVAS_MODES  # noqa: E402  (defined where the command line reads it without torch)


def check_canvas_mode(mode: str) -> str:
    if mode not in CANVAS_MODES:
        raise BackMixError(f"--canvas-mode (canvas_mode) must be one of {', '.join(CANVAS_MODES)}, got {mode!r}")
    return mode


def to_canvas(image: torch.Tensor, size: int, mode: str = "center") -> torch.Tensor:
    """The ``size x size`` canvas of ``image`` in canvas ``mode`` (antialiased); uint8 in and out."""
    if image.shape[-2:] == (size, size):
        return image
    if check_canvas_mode(mode) == "stretch":
        return TF.resize(image, [size, size], antialias=True)
    return TF.center_crop(TF.resize(image, [size], antialias=True), [size, size])


def is_jpeg(data: torch.Tensor) -> bool:
    """Whether file bytes (uint8 [N]) start with a JPEG's SOI marker and a segment marker."""
    return data.numel() >= 3 and data[:3].tolist() == [0xFF, 0xD8, 0xFF]


def decode_canvas(path: str, size: int, mode: str = "center") -> torch.Tensor:
    return to_canvas(decode_rgb(path), size, mode)


def read_canvas(index, row: int, size: int, mode: str = "center", on_error: str = "raise", decode=None):
    """The uint8 [3, size, size] canvas of dataset row ``row`` of ``index`` (an ``ImageIndex``): the one read
    every loader, the CAM pass and the beton writer make. A file missing or changed since it was
    indexed raises ``BackMixError`` whatever ``on_error`` says (the data set no longer matches its
    caches and betons). One that does not decode: on_error "raise" raises ``DecodeError``, "skip"
    returns None. on_error "return" returns either error instead of raising it (a worker hands it to
    the loader, which applies the policy where the user sees it, in one line). ``decode(path, size,
    mode)``: default ``decode_canvas``."""
    try:
        return (decode or decode_canvas)(index.checked_path(row), size, mode)
    except BackMixError as e:
        if on_error == "return":
            return e
        if on_error == "skip" and isinstance(e, DecodeError):
            return None
        raise


def check_canvas(canvas: int, crop: int, grid: int) -> None:
    if grid < 1:
        raise BackMixError(f"--grid must be >= 1, got {grid}")
    if canvas <= 0 or crop <= 0:
        raise BackMixError(f"canvas ({canvas}) and crop ({crop}) sizes must be positive")
    if crop > canvas:
        raise BackMixError(f"crop size {crop} is larger than the canvas {canvas}")
    if canvas % grid:
        raise BackMixError(f"canvas size {canvas} must be a multiple of the grid {grid} "
                           "so that every cell covers whole pixels")


def to_numpy_hwc(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).contiguous().numpy()
