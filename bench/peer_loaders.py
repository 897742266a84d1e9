"""The stock loaders ``backmix bench peers`` sets beside backmix's: each family's loader written as its
own documentation recommends, RandomResizedCrop + flip + normalise, yielding (images, labels).

torch: the ImageNet recipe of torchvision's references and PyTorch's ImageNet example: ``ImageFolder``
with ``RandomResizedCrop``, ``RandomHorizontalFlip``, ``ToTensor`` and ``Normalize`` in its workers, a
shuffling ``DataLoader`` (pinned memory when a GPU takes the batches).

FFCV: the ffcv-imagenet recipe. The beton is written by FFCV's ``DatasetWriter`` from torchvision's
``ImageFolder`` with ``RGBImageField(max_resolution=256, write_mode='jpg')`` and an ``IntField``
label; it is read with ``RandomResizedCropRGBImageDecoder``, ``RandomHorizontalFlip``, ``ToTensor``,
(``ToDevice``,) ``ToTorchImage`` and ``NormalizeImage`` in ``OrderOption.RANDOM``. On a CPU,
``NormalizeImage`` comes before ``ToTensor``: its CPU code is a numba kernel over the HWC images, and
FFCV's loader hangs when it is handed the torch view ``ToTorchImage`` makes.

DALI: the DALI ResNet-50 example: ``fn.readers.file`` over the class folders,
``fn.decoders.image_random_crop`` (which decodes the crop's region only), ``fn.resize`` to the crop
size and ``fn.crop_mirror_normalize`` with a coin-flip mirror, through ``DALIGenericIterator``; CPU
operators without a GPU, the mixed decoder and GPU operators with one.

The crop's area and aspect ranges are torchvision's everywhere (DALI's example narrows them), so every
loader does the same work, and every loader drops an epoch's last partial batch, as backmix's do in
the benchmarks: a batch is always ``batch_size`` images.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from backmix.osr_data.decode import IMAGENET_MEAN, IMAGENET_STD
from backmix.osr_data.index import ImageIndex
from backmix.pipeline.sampling import RRC_RATIO, RRC_SCALE, RRC_TRIES

log = logging.getLogger("backmix")

STOCK_MAX_RESOLUTION = 256    # the stock beton's longer side, as the ffcv-imagenet recipe writes it


class StockLoader:
    """What ``bench.time_loader`` drives: ``set_epoch`` (the stock loaders keep their own epochs) and one
    epoch of (images, labels) per iteration."""

    skipped = 0

    def __init__(self, epoch: Callable[[], Iterable]) -> None:
        self._epoch = epoch

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self) -> Iterator:
        return iter(self._epoch())


def torch_stock(folder: str | Path, *, batch_size: int, workers: int, crop: int,
                device: torch.device) -> StockLoader:
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    recipe = transforms.Compose([transforms.RandomResizedCrop(crop), transforms.RandomHorizontalFlip(),
                                 transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    loader = DataLoader(datasets.ImageFolder(str(folder), recipe), batch_size=batch_size, shuffle=True,
                        num_workers=workers, pin_memory=device.type == "cuda", drop_last=True)

    def epoch():
        for images, labels in loader:
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    return StockLoader(epoch)


def stock_beton_path(index: ImageIndex, jpeg_quality: int) -> Path:
    """Where the stock beton of ``index`` is (or goes): beside the folder as backmix's betons are, or in
    the user's cache; named apart from backmix's, whose fields differ."""
    from backmix.pipeline.beton_location import beton_locations, default_destination

    storage = {"storage": "jpg", "max_resolution": STOCK_MAX_RESOLUTION, "jpeg_quality": jpeg_quality}
    places = [p.with_name("stock-" + p.name) for p in beton_locations(index, None, **storage)]
    found = [p for p in places if p.exists()]
    if found:
        return found[0]
    out = default_destination(index, None, **storage)
    return out.with_name("stock-" + out.name)


def write_stock_beton(index: ImageIndex, jpeg_quality: int, workers: int) -> Path:
    """The stock beton of ``index``, written once by FFCV's ``DatasetWriter`` from torchvision's
    ``ImageFolder`` (the ffcv-imagenet recipe), atomically and under a lock, as backmix's are."""
    from ffcv.fields import IntField, RGBImageField
    from torchvision.datasets import ImageFolder

    from backmix.osr_data.filelock import exclusive_lock

    from backmix._fs import atomic_file, check_output_file

    from backmix.pipeline.beton_process import write_in_child   # FFCV's writer, stoppable, in a child

    path = check_output_file(stock_beton_path(index, jpeg_quality))
    fields = {"image": RGBImageField(write_mode="jpg", max_resolution=STOCK_MAX_RESOLUTION, jpeg_quality=jpeg_quality),
              "label": IntField()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(path):
        if not path.exists():
            log.info("writing the stock FFCV beton once (DatasetWriter, max_resolution %d, jpg %d): %s",
                     STOCK_MAX_RESOLUTION, jpeg_quality, path)
            with atomic_file(path) as tmp:
                write_in_child(tmp, ImageFolder(str(index.root)), fields, workers, None, f"writing {path.name}")
    return path


def ffcv_stock(beton: str | Path, *, batch_size: int, workers: int, crop: int,
               device: torch.device) -> StockLoader:
    from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage

    mean, std = np.array(IMAGENET_MEAN) * 255, np.array(IMAGENET_STD) * 255
    normalize = NormalizeImage(mean, std, np.float32)
    decode = [RandomResizedCropRGBImageDecoder((crop, crop), scale=RRC_SCALE, ratio=RRC_RATIO), RandomHorizontalFlip()]
    if device.type == "cuda":
        image = decode + [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(), normalize]
        label = [IntDecoder(), ToTensor(), Squeeze(), ToDevice(device, non_blocking=True)]
    else:
        image = decode + [normalize, ToTensor(), ToTorchImage()]
        label = [IntDecoder(), ToTensor(), Squeeze()]
    loader = Loader(str(beton), batch_size=batch_size, num_workers=workers, order=OrderOption.RANDOM,
                    drop_last=True, pipelines={"image": image, "label": label})
    return StockLoader(lambda: loader)


def dali_stock(folder: str | Path, *, batch_size: int, workers: int, crop: int,
               device: torch.device) -> StockLoader:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    gpu = device.type == "cuda"

    @pipeline_def(batch_size=batch_size, num_threads=max(1, workers), device_id=device.index if gpu else None)
    def recipe():
        jpegs, labels = fn.readers.file(file_root=str(folder), random_shuffle=True, name="Reader")
        images = fn.decoders.image_random_crop(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                               random_area=list(RRC_SCALE), random_aspect_ratio=list(RRC_RATIO),
                                               num_attempts=RRC_TRIES)
        images = fn.resize(images, resize_x=crop, resize_y=crop, interp_type=types.INTERP_TRIANGULAR)
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", crop=(crop, crop),
                                          mean=[255 * m for m in IMAGENET_MEAN], std=[255 * s for s in IMAGENET_STD],
                                          mirror=fn.random.coin_flip(probability=0.5))
        return images, (labels.gpu() if gpu else labels)

    pipe = recipe()
    pipe.build()
    batches = DALIGenericIterator(pipe, ["images", "labels"], reader_name="Reader",
                                  last_batch_policy=LastBatchPolicy.DROP, auto_reset=True)

    def epoch():
        for (out,) in batches:
            yield out["images"], out["labels"].squeeze(-1).long()
    return StockLoader(epoch)


# family -> what its stock loader is, in a table's words
STOCK_NAMES = {"torch": "torchvision ImageFolder + RandomResizedCrop, DataLoader",
               "ffcv": "FFCV's ImageNet recipe: DatasetWriter beton, RandomResizedCropRGBImageDecoder",
               "dali": "fn.readers.file + fn.decoders.image_random_crop + resize + crop_mirror_normalize"}
