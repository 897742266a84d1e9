"""One configuration shared by every loader backend."""
from __future__ import annotations

import functools
import operator
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Optional

import numpy as np
import torch

from backmix.device import choose_device, parse_device  # noqa: F401  (choose_device: the benchmarks import it from here)
from backmix.osr_data.decode import check_canvas, check_canvas_mode
from backmix.osr_data.errors import BackMixError
from backmix.osr_data.normalize import IMAGENET_MEAN, IMAGENET_STD

from .augment import AUTO_AUGMENT_POLICIES
from .sampling import (BackMixSampler, EpochSampler, check_augment, check_batch_size, check_crop_from, check_fraction,
                       check_last_batch, check_seed, view_seed)

ON_ERROR = ("raise", "skip")

# What a value of each annotated type may be: numpy's scalars count as numbers; a bool is not a number.
KINDS = {int: ((int, np.integer), "a whole number (int)"), float: ((int, float, np.integer, np.floating), "a number"),
         bool: ((bool, np.bool_), "True or False"), str: ((str,), "a string"),
         torch.device: ((torch.device,), "a torch.device")}


def _accepts(hint, value) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):     # Optional[X]
        return any(_accepts(h, value) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) is tuple:                                # tuple[float, ...]
        return isinstance(value, (tuple, list)) and all(_accepts(typing.get_args(hint)[0], v) for v in value)
    if hint not in KINDS:
        return True                                                     # a type without a rule here
    kinds, _ = KINDS[hint]
    return isinstance(value, kinds) and (hint is bool or not isinstance(value, (bool, np.bool_)))


def _wanted(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_wanted(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "None"
    if typing.get_origin(hint) is tuple:
        return f"a tuple or list of {_wanted(typing.get_args(hint)[0])}s".replace("a numbers", "numbers")
    return KINDS[hint][1] if hint in KINDS else str(hint)


@functools.cache
def _field_types(cls) -> tuple:
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name]) for f in fields(cls))


def _plain(value):
    """numpy's scalars as Python's (torch's seeding takes no np.int64), a list as a tuple."""
    if isinstance(value, np.generic):
        return value.item()
    return tuple(_plain(v) for v in value) if isinstance(value, (list, tuple)) else value


def check_field_types(config) -> None:
    """A ``TypeError`` naming the first field of the dataclass ``config`` whose value is not of its
    annotated type, before any work is done with it (a float batch size would fail deep in a sampler);
    accepted numpy scalars and lists become Python's scalars and tuples."""
    for name, hint in _field_types(type(config)):
        value = getattr(config, name)
        if not _accepts(hint, value):
            raise TypeError(f"{name} must be {_wanted(hint)}, not {type(value).__name__} ({value!r:.40})")
        setattr(config, name, _plain(value))


@dataclass
class LoaderConfig:
    batch_size: int = 64
    canvas: int = 40             # side of the square canvas the mix works on
    crop: int = 32               # side of the random crop the model sees
    canvas_mode: str = "center"  # "center": resize the shorter side, centre square; "stretch": both sides
    augment: str = "crop"        # after the mix: "crop" (random crop + flip) or "rrc" (RandomResizedCrop + flip)
    crop_from: str = "canvas"    # rrc's training crops: from the "canvas", or from the whole "image" (its own pixels)
    auto_augment: str = "none"   # training, after the crop: "trivialaugment" or "randaugment" (torchvision v2)
    grid: int = 8                # g of the g x g foreground maps
    backmix: bool = True
    clean: bool = True           # with BackMix, also the clean crop; False: the mixed one only (the authors' recipe)
    mix_prob: Optional[float] = None  # with BackMix: one crop per image, its mixed one with this probability
                                      # (drawn per image from (seed, epoch, rank, step)), else its clean one
    views: int = 1               # without BackMix: 2 = a second, independently augmented clean crop of each image
    box_fraction: float = 0.25
    top_k_ratio: float = 0.25
    seed: int = 0
    shuffle: bool = True
    train: bool = True           # False: centre crop, no flip (evaluation)
    rank: int = 0
    world_size: int = 1
    last_batch: str = "keep"     # "keep" (every sample once; equal steps per rank) or "drop" (full batches only)
    num_workers: int = 2
    on_error: str = "raise"      # a file that does not decode: "raise" or "skip" (and count)
    device: str | torch.device = "auto"   # "auto" (CUDA when there is one), "cpu", "cuda", "cuda:N" or a
                                          # torch.device; held as the torch.device it names (``parse_device``)
    keep_canvas: bool = True     # batches carry the uint8 canvas; False: only when asked (``Loader.keep_canvases``)
    mean: tuple[float, ...] = field(default=IMAGENET_MEAN)
    std: tuple[float, ...] = field(default=IMAGENET_STD)

    def __post_init__(self) -> None:
        # Every rule of a loader's arguments is checked here, once: ``backmix train`` builds its loaders'
        # configs from its options (``trainers.config.loader_config``) and reports these same lines,
        # which name the command line's flag beside the argument.
        check_field_types(self)
        check_canvas(self.canvas, self.crop, self.grid)
        check_canvas_mode(self.canvas_mode)
        check_augment(self.augment)
        check_crop_from(self.crop_from, self.augment, self.canvas_mode)
        if self.auto_augment not in ("none",) + AUTO_AUGMENT_POLICIES:
            raise BackMixError(f"--auto-augment (auto_augment) must be none or one of "
                               f"{', '.join(AUTO_AUGMENT_POLICIES)}, got {self.auto_augment!r}")
        check_fraction("box_fraction", self.box_fraction)
        check_fraction("top_k_ratio", self.top_k_ratio)
        check_batch_size(self.batch_size)
        if self.on_error not in ON_ERROR:
            raise BackMixError(f"--on-error (on_error) must be one of {', '.join(ON_ERROR)}, got {self.on_error!r}")
        check_last_batch(self.last_batch)
        if not (self.clean or self.backmix):
            raise BackMixError("a loader without BackMix must return the clean images (clean=True)")
        if self.mix_prob is not None:
            # 0 would never mix: that is the loader without BackMix
            if not 0 < self.mix_prob <= 1:
                raise BackMixError(f"--mix-prob (mix_prob) must lie in (0, 1], got {self.mix_prob}")
            if not (self.backmix and self.clean):
                raise BackMixError("--mix-prob (mix_prob) picks each image's mixed or clean crop: it needs "
                                   "backmix=True (not --no-backmix) and clean=True")
        if self.views not in (1, 2):
            raise BackMixError(f"views must be 1 or 2, got {self.views!r}")
        if self.views == 2 and self.backmix:
            raise BackMixError("views=2 is the two-view baseline (--method baseline-2view): it needs "
                               "backmix=False (--no-backmix)")
        self.device = parse_device(self.device)
        check_seed(self.seed, "--seed (seed)")
        for name in ("mean", "std"):
            values = getattr(self, name)
            # The batches are normalised in float32: x / std there must stay finite too.
            with np.errstate(over="ignore", divide="ignore"):
                as32 = np.asarray(values, dtype=np.float64).astype(np.float32)
                bad = len(values) != 3 or not np.isfinite(as32).all() or (
                    name == "std" and (min(values) <= 0 or not np.isfinite(np.float32(1) / as32).all()))
            if bad:
                raise BackMixError(f"{name} must be 3 finite numbers (one per RGB channel), finite in float32"
                                   f"{', each above 0 with a reciprocal finite in float32' if name == 'std' else ''}"
                                   f", got {values!r}")
        if self.num_workers < 0:
            raise BackMixError(f"--workers (num_workers) must be >= 0, got {self.num_workers}")

    def sampler(self, view: int = 0) -> BackMixSampler:
        """The draws of view ``view`` of each image (view 1: the two-view baseline's second crop)."""
        return BackMixSampler(canvas=self.canvas, crop=self.crop, grid=self.grid,
                              box_fraction=self.box_fraction, top_k_ratio=self.top_k_ratio,
                              seed=view_seed(self.seed, view), augment=self.augment, crop_from=self.crop_from)

    @property
    def resizes(self) -> bool:
        """Whether training crops are resized (rrc); evaluation is always the centre crop."""
        return self.augment == "rrc" and self.train

    @property
    def crops_images(self) -> bool:
        """Whether training crops are cut from the whole images (crop_from "image"): sources must hand
        the core each batch's whole images (``SourceBatch.photos``)."""
        return self.crop_from == "image" and self.train


def _whole(value) -> int:
    """``value`` as an int when it is a whole number (a float 3.0 from a JSON file too); a TypeError,
    ValueError or OverflowError otherwise (1.9, inf, "3", True)."""
    if isinstance(value, (float, np.floating)):
        if not float(value).is_integer():
            raise ValueError(f"{value!r} is not a whole number")
        return int(value)
    if isinstance(value, (bool, np.bool_)):
        raise TypeError("a bool is not a count")
    return operator.index(value)


class LoaderPosition:
    """The epoch and the step within it, shared by every backend, in torchdata's ``StatefulDataLoader``
    convention: ``state_dict()`` taken after k batches of an epoch, loaded into a fresh loader, makes
    its next iteration continue with batch k. Every batch is a pure function of (seed, epoch, rank,
    step), so the continued stream is the uninterrupted one."""

    epoch_sampler: EpochSampler
    dataset_indices: np.ndarray

    def _start_position(self) -> None:
        self.epoch, self.skipped = 0, 0   # skipped: files that did not decode, so far
        self.next_step = 0                # the step the running epoch yields next
        self._resume_at = 0               # the step the next iteration starts at

    def set_epoch(self, epoch: int) -> None:
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise BackMixError(f"set_epoch: epoch must be a whole number >= 0, got {epoch!r}")
        if epoch != self.epoch:           # the epoch a loaded state is in keeps its position
            self._resume_at = 0
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.epoch_sampler)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.next_step, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        try:
            epoch, step, skipped = (_whole(state[key]) for key in ("epoch", "step", "skipped"))
        except (KeyError, TypeError, ValueError, OverflowError):
            raise BackMixError(f"not a loader state (want epoch, step, skipped: whole numbers): "
                               f"{state!r:.200}") from None
        if epoch < 0 or not 0 <= step <= len(self) or skipped < 0:
            raise BackMixError(f"loader state {state!r} is outside this loader's {len(self)} steps per epoch")
        self.epoch, self._resume_at, self.next_step, self.skipped = epoch, step, step, skipped

    def epoch_plan(self) -> list[tuple[int, np.ndarray]]:
        """(step, dataset rows) of each batch this iteration makes: the epoch's, from the resume step on."""
        start, self._resume_at = self._resume_at, 0
        self.next_step = start
        ids = self.dataset_indices
        return [(step, ids[b]) for step, b in enumerate(self.epoch_sampler.batches(self.epoch)) if step >= start]
