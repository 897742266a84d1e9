"""DALI graph pieces the loader's graphs (``dali_graphs``) and the benchmark share: the whole decode
(``decode_whole``); the canvas made from it (``decode_to_canvas``, torchvision's canvas within a grey
level); the crop, flip and normalise of a canvas (``crop_normalize``); the image region under a box of
the canvas, decoded alone or sliced from the whole decode, resized once (``canvas_to_image``,
``decode_box``)."""
from __future__ import annotations

import numpy as np

from .config import LoaderConfig
from .sampling import BatchParams

PREFETCH = 2   # DALI's prefetch queue depth: batches it pulls from the external source ahead of the consumer


def round_half_even(x):
    """Python's round() of a DALI float that is a whole or a half number (as torchvision's CenterCrop)."""
    from nvidia.dali import math as dmath

    whole = dmath.floor(x)
    half = 2.0 * (x - whole)                      # 1 for a half number, else 0
    odd = whole - 2.0 * dmath.floor(whole / 2.0)  # 1 when ``whole`` is odd
    return whole + half * odd

def decode_whole(files, gpu: bool):
    """DALI ops: encoded files -> their whole images, uint8 HWC RGB, pixels as stored (EXIF orientation
    not applied, as the reference loader decodes them)."""
    from nvidia.dali import fn, types

    return fn.decoders.image(files, device="mixed" if gpu else "cpu", output_type=types.RGB, adjust_orientation=False,
                             jpeg_fancy_upsampling=True)

def decode_to_canvas(files, size: int, gpu: bool, mode: str = "center", images=None):
    """DALI ops: encoded files -> uint8 HWC canvases of size x size, antialiased, in canvas ``mode`` as
    ``osr_data.decode.to_canvas``: "stretch" resizes both sides; "center" is torchvision's Resize (the
    shorter side to ``size``, the longer to int(size * long / short), from the file's header) then
    CenterCrop, computed as one resize of the centre square's source region: only the canvas's pixels
    are resampled (the longer side's cut-off ends never are). ``images``: the files already decoded
    (``decode_whole``), when the graph uses them for more than the canvas."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    images = decode_whole(files, gpu) if images is None else images
    if mode == "stretch":
        return fn.resize(images, size=[size, size], mode="stretch", antialias=True,
                         interp_type=types.INTERP_LINEAR)
    shape = fn.peek_image_shape(files, adjust_orientation=False)   # H, W, C on the host, from the header
    hw = fn.cast(shape[0:2], dtype=types.FLOAT)
    h, w = hw[0], hw[1]
    # The shorter side becomes ``size`` exactly; max() picks it without a branch per sample.
    resized = fn.stack(dmath.max(dmath.floor(size * h / w), float(size)),
                       dmath.max(dmath.floor(size * w / h), float(size)))
    corner = round_half_even((resized - size) / 2.0)   # CenterCrop's, in the resized image
    # The same sampling positions as resizing the whole image to ``resized`` and slicing the square
    # (within float rounding: a pixel may differ by one grey level, well inside the resize's tolerance).
    scale = hw / resized
    return fn.resize(images, size=[size, size], roi_start=corner * scale, roi_end=(corner + size) * scale,
                     roi_relative=False, antialias=True, interp_type=types.INTERP_LINEAR)

def canvas_to_image(shape, size: int, mode: str):
    """DALI ops: (offset, scale), float [2] (y, x) per sample, such that canvas point p (continuous
    coordinates) lies at image point (p + offset) * scale. ``shape``: fn.peek_image_shape's H, W, C.
    "stretch" scales each side by side / size; "center" is ``decode_to_canvas``'s geometry: the
    resized image's centre square, the corner rounded as torchvision's CenterCrop; "image": the box
    is in the image's own pixels."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    hw = fn.cast(shape[0:2], dtype=types.FLOAT)
    if mode == "image":   # boxes in the image's own pixels (crops cut from the image)
        return hw * 0.0, hw * 0.0 + 1.0
    if mode == "stretch":
        return hw * 0.0, hw / float(size)
    h, w = hw[0], hw[1]
    resized = fn.stack(dmath.max(dmath.floor(size * h / w), float(size)),
                       dmath.max(dmath.floor(size * w / h), float(size)))
    return round_half_even((resized - size) / 2.0), hw / resized

def decode_box(files, shape, box, out, size: int, mode: str, gpu: bool, images=None):
    """DALI ops: the canvas box ``box`` (float [4]: y, x, height, width in canvas pixels) of each image
    as uint8 HWC ``out`` (an int, or float [2] per sample), resized once, linear and antialiased. Only
    the image region under the box is decoded; or, given ``images`` (the files decoded whole, when the
    graph makes their canvases too), the region is sliced from them. A margin of one filter support
    is taken around the region so that its edge pixels are filtered as inside the whole image."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    offset, scale = canvas_to_image(shape, size, mode)
    hw = fn.cast(shape[0:2], dtype=types.FLOAT)
    start = (box[0:2] + offset) * scale
    end = (box[0:2] + box[2:4] + offset) * scale
    # The antialiasing filter's radius in image pixels: the box's image extent per output pixel.
    margin = dmath.ceil((end - start) / out) + 1.0
    lo = dmath.clamp(dmath.floor(start) - margin, 0.0, hw - 1.0)
    hi = dmath.clamp(dmath.ceil(end) + margin, lo + 1.0, hw)
    where = {"axis_names": "HW", "normalized_anchor": False, "normalized_shape": False}
    if images is None:
        region = fn.decoders.image_slice(files, lo, hi - lo, device="mixed" if gpu else "cpu", **where,
                                         output_type=types.RGB, adjust_orientation=False, jpeg_fancy_upsampling=True)
    else:
        region = fn.slice(images, lo, hi - lo, **where)
    return fn.resize(region, size=[out, out] if isinstance(out, int) else out, roi_start=start - lo, roi_end=end - lo,
                     roi_relative=False, antialias=True, interp_type=types.INTERP_LINEAR)


def crop_where(p: BatchParams, config: LoaderConfig) -> tuple:
    """Where each image's crop is, as ``crop_normalize`` takes it (lists of float32 numpy arrays): with
    a resized crop its box's corner and height x width in the canvas; otherwise the corner as
    fractions (x, y) of the free range, which crop_mirror_normalize rounds back to the integer corner
    exactly (checked by the tests)."""
    if config.resizes:
        return list(p.crops.astype(np.float32)), list(p.crop_sizes.astype(np.float32))
    pos = (p.crops / max(config.canvas - config.crop, 1)).astype(np.float32)
    return list(pos[:, 1]), list(pos[:, 0])


def crop_normalize(canvas, flips, where, config: LoaderConfig):
    """DALI ops: uint8 HWC canvases -> the float CHW crops, flipped where ``flips`` and normalised.
    A resized crop is the box sliced, then resized alone (so its edge pixels are clamped at the box, as
    in the torch op), in float, linear, without antialiasing: ``resized_crop_flip``'s arithmetic."""
    from nvidia.dali import fn, types

    c = config.crop
    norm = {"mirror": flips, "mean": [255.0 * m for m in config.mean], "std": [255.0 * v for v in config.std],
            "dtype": types.FLOAT, "output_layout": "CHW"}
    if config.resizes:
        box = fn.slice(canvas, where[0], where[1], axis_names="HW", normalized_anchor=False, normalized_shape=False)
        x = fn.resize(box, size=[c, c], interp_type=types.INTERP_LINEAR, antialias=False, dtype=types.FLOAT)
        return fn.crop_mirror_normalize(x, **norm)
    return fn.crop_mirror_normalize(canvas, crop=(c, c), crop_pos_x=where[0], crop_pos_y=where[1], **norm)
