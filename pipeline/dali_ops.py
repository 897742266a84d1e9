"""DALI graph pieces the loader's graphs (``dali_graphs``) and the benchmark share, and the host
geometry they are fed: the whole decode (``decode_whole``); the canvas made from it
(``decode_to_canvas``, torchvision's canvas within a grey level, at ``canvas_rois``); the crop, flip
and normalise of a canvas (``crop_normalize``); the image region under boxes of the canvas, decoded
alone or sliced from the whole decode, each box resized once (``box_regions``, ``decode_regions``).

The geometry is numpy on the host, from each file's stored size (read from its header as the feeder
reads the file): a DALI arithmetic op costs tens of microseconds a batch however small its data, and
the geometry of a box took dozens of them."""
from __future__ import annotations

import numpy as np

from .config import LoaderConfig
from .sampling import BatchParams

PREFETCH = 2   # DALI's prefetch queue depth: batches it pulls from the external source ahead of the consumer


def batch_of(values: np.ndarray) -> np.ndarray:
    """A host array [B, ...] as one batch of an external source: one contiguous array, which DALI takes
    in one copy (a list of B arrays costs a copy and a check per sample)."""
    return np.ascontiguousarray(values)


def canvas_in_image(sizes: np.ndarray, size: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(offset, scale), float [B, 2] (y, x), such that canvas point p (continuous coordinates) lies at
    image point (p + offset) * scale. ``sizes``: int [B, 2], each image's stored height and width.
    "stretch" scales each side by side / size; "center" is torchvision's Resize (the shorter side to
    ``size``, the longer to int(size * long / short)) then CenterCrop (its corner rounded half to even,
    as Python's round); "image": the boxes are in the image's own pixels."""
    hw = sizes.astype(np.float64)
    if mode == "image":
        return np.zeros_like(hw), np.ones_like(hw)
    if mode == "stretch":
        return np.zeros_like(hw), hw / size
    resized = np.maximum(np.floor(size * hw / hw[:, ::-1]), size)
    return np.round((resized - size) / 2.0), hw / resized


def canvas_rois(sizes: np.ndarray, size: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """The image region each canvas resamples (float32 [B, 2] start, end; y, x in image pixels): the
    whole image when stretched; with "center" only the centre square's source, so that the longer
    side's cut-off ends are never resampled."""
    offset, scale = canvas_in_image(sizes, size, mode)
    return batch_of((offset * scale).astype(np.float32)), batch_of(((offset + size) * scale).astype(np.float32))


def box_regions(sizes: np.ndarray, boxes: list, size: int, mode: str) -> tuple:
    """Where ``decode_regions`` decodes and resamples the boxes of each image (float32 [B, 2] arrays).
    ``boxes``: (box, out) pairs: box float [B, 4] (y, x, height, width in canvas pixels, or image pixels
    with mode "image"), out int or float [B, 2] the size it is resized to. Returned: the region's corner
    and extent in the image, the smallest rectangle holding every box with a margin of one filter
    support (the antialiasing filter's radius, the box's image extent per output pixel, plus one) so
    that edge pixels are filtered as inside the whole image; then each box's start and end in the
    region."""
    offset, scale = canvas_in_image(sizes, size, mode)
    hw = sizes.astype(np.float64)
    spans, lo, hi = [], None, None
    for box, out in boxes:
        box = box.astype(np.float64)
        start = (box[:, 0:2] + offset) * scale
        end = (box[:, 0:2] + box[:, 2:4] + offset) * scale
        margin = np.ceil((end - start) / np.asarray(out, dtype=np.float64)) + 1.0
        first, last = np.floor(start) - margin, np.ceil(end) + margin
        lo = first if lo is None else np.minimum(lo, first)
        hi = last if hi is None else np.maximum(hi, last)
        spans.append((start, end))
    lo = np.clip(lo, 0.0, hw - 1.0)
    hi = np.minimum(np.maximum(hi, lo + 1.0), hw)
    f32 = lambda a: batch_of(a.astype(np.float32))   # noqa: E731
    return (f32(lo), f32(hi - lo)) + tuple(f32(a - lo) for span in spans for a in span)


def decode_whole(files, gpu: bool):
    """DALI ops: encoded files -> their whole images, uint8 HWC RGB, pixels as stored (EXIF orientation
    not applied, as the reference loader decodes them)."""
    from nvidia.dali import fn, types

    return fn.decoders.image(files, device="mixed" if gpu else "cpu", output_type=types.RGB, adjust_orientation=False,
                             jpeg_fancy_upsampling=True)


def decode_to_canvas(files, size: int, gpu: bool, rois: tuple, images=None):
    """DALI ops: encoded files -> uint8 HWC canvases of size x size, antialiased, as
    ``osr_data.decode.to_canvas``: one linear resize of the image region ``rois`` (start, end: the
    inputs fed from ``canvas_rois``). ``images``: the files already decoded (``decode_whole``), when the
    graph uses them for more than the canvas."""
    from nvidia.dali import fn, types

    images = decode_whole(files, gpu) if images is None else images
    return fn.resize(images, size=[size, size], roi_start=rois[0], roi_end=rois[1], roi_relative=False,
                     antialias=True, interp_type=types.INTERP_LINEAR)


def decode_regions(files, region: tuple, spans: list, gpu: bool, images=None) -> list:
    """DALI ops: for each (start, end, out) of ``spans``, that span of each image's ``region`` (corner,
    extent; the inputs fed from ``box_regions``) as uint8 HWC ``out`` (an int, or float [2] per sample),
    resized once, linear and antialiased. The region alone is decoded, once for all the spans (a JPEG
    decoder reads the entropy-coded rows down to a region's bottom whatever its width, so one region
    holding two boxes costs less than two); or, given ``images`` (the files decoded whole, when the
    graph makes their canvases too), it is sliced from them."""
    from nvidia.dali import fn, types

    where = {"axis_names": "HW", "normalized_anchor": False, "normalized_shape": False}
    if images is None:
        pixels = fn.decoders.image_slice(files, region[0], region[1], device="mixed" if gpu else "cpu", **where,
                                         output_type=types.RGB, adjust_orientation=False, jpeg_fancy_upsampling=True)
    else:
        pixels = fn.slice(images, region[0], region[1], **where)
    return [fn.resize(pixels, size=[out, out] if isinstance(out, int) else out, roi_start=start, roi_end=end,
                      roi_relative=False, antialias=True, interp_type=types.INTERP_LINEAR)
            for start, end, out in spans]


def crop_where(p: BatchParams, config: LoaderConfig) -> tuple:
    """Where each image's crop is, as ``crop_normalize`` takes it (float32 numpy arrays, a batch each): with
    a resized crop its box's corner and height x width in the canvas; otherwise the corner as
    fractions (x, y) of the free range, which crop_mirror_normalize rounds back to the integer corner
    exactly (checked by the tests)."""
    if config.resizes:
        return batch_of(p.crops.astype(np.float32)), batch_of(p.crop_sizes.astype(np.float32))
    pos = (p.crops / max(config.canvas - config.crop, 1)).astype(np.float32)
    return batch_of(pos[:, 1]), batch_of(pos[:, 0])


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
