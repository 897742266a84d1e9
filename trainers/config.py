"""The resolved configuration of one training run (written to RUN/config.json)."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from backmix.cam_cache.node_folders import LAYOUTS as CACHE_LAYOUTS
from backmix.models import check_arch
from backmix.osr_data.errors import BackMixError
from backmix.device import check_device_name
from backmix.osr_data.protocols import PROTOCOLS, SSB_PROTOCOLS
from backmix.pipeline.config import LoaderConfig
from backmix.pipeline.beton_location import STORAGES as BETON_STORAGES
from backmix.pipeline.loaders import BACKENDS, backend_options, check_backend_config
from backmix.pipeline.augment import AUTO_AUGMENT_POLICIES

from .methods import forward_passes

OPTIMIZERS = ("sgd", "adamw")
AMP = ("auto", "bf16", "fp16", "off")
REGEN = ("loop", "pass")
AUTO_AUGMENTS = ("none",) + AUTO_AUGMENT_POLICIES
LOG_SINKS = ("csv", "tensorboard")
# The options of the run itself; the loader's (--augment, --on-error, ...) are LoaderConfig's to check.
CHOICES = {"opt": OPTIMIZERS, "backend": BACKENDS, "amp": AMP, "regen": REGEN, "beton_mode": BETON_STORAGES,
           "cache_layout": CACHE_LAYOUTS}


# Every numeric field of the run itself and the values it accepts (besides being a finite number); the
# loader's (--batch-size, --seed, --workers, --mix-prob, ...) are LoaderConfig's to check.
def _at_least(low):
    return lambda v: v >= low, f">= {low}"


_POSITIVE = (lambda v: v > 0, "> 0")
NUMERIC_RANGES = {
    "epochs": _at_least(1), "width": _POSITIVE, "lr": _POSITIVE,
    "sgd_momentum": (lambda v: 0 <= v < 1, "in [0, 1)"), "weight_decay": _at_least(0),
    "warmup_epochs": _at_least(0), "w_raw": _at_least(0), "w_mix": _at_least(0), "regen_every": _at_least(0),
    "momentum": (lambda v: 0 <= v <= 1, "in [0, 1]"), "eval_every": _at_least(0),
    "save_every": _at_least(0), "jpeg_quality": (lambda v: v == int(v) and 1 <= v <= 100, "in 1..100"), "val_fraction": (lambda v: 0 <= v < 1, "in [0, 1)"), "log_every": _at_least(0), "label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "ema": (lambda v: v == 0 or 0 < v < 1, "in (0, 1), or 0 for none"), "clip_grad": _at_least(0),
    "mixup": _at_least(0), "cutmix": _at_least(0),
    "grad_accum_steps": (lambda v: v == int(v) and v >= 1, ">= 1, a whole one"),
}


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_number(name: str, value) -> None:
    """One line naming the option when ``value`` is not a finite number in its field's range."""
    accepts, want = NUMERIC_RANGES[name]
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (number and accepts(value)):
        raise BackMixError(f"{option(name)} must be a finite number {want}, got {value}")


@dataclass
class TrainConfig:
    data: str = ""                    # prepared root holding train/ and test/
    out: str = ""                     # run folder
    epochs: int = 10
    arch: str = "cnn32"
    width: float = 0.5                # cnn32 only: channel multiplier
    batch_size: int = 64
    lr: float = 0.05
    opt: str = "sgd"
    sgd_momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0        # linear warm-up, then cosine to zero, per step
    split: str = "0"                  # split number 0..4, comma list of known class names, or all (every class)
    protocol: Optional[str] = None    # published split list (osr_data/protocols.json): --split indexes it
    splits_file: Optional[str] = None  # a JSON list of known-class name lists: --split indexes it
    val_fraction: float = 0.1         # per-class share of the known training images held out to select best.pt
    backend: str = "reference"
    ray_address: Optional[str] = None  # ray backend: "auto" or HOST:PORT of a cluster; None: Ray on this machine
    prefetch: Optional[int] = None    # ray backend: batches in flight at most; None: the loader's default
    beton_mode: str = "raw"           # ffcv backend: the betons' canvases, raw (the reference stream) or jpg
    jpeg_quality: int = 90            # ffcv backend, beton_mode jpg: the betons' JPEG quality
    backmix: bool = True              # False: plain baseline (loss on the raw images only)
    w_raw: float = 1.0                # weight of CE on the clean crops (0 with BackMix: mixed only)
    w_mix: float = 1.0                # weight of CE on the mixed crops
    mix_prob: Optional[float] = None  # with BackMix: one crop per image, the mixed one with this probability
    views: int = 1                    # without BackMix: 2 = CE on two independently augmented clean crops
    regen_every: int = 2              # rebuild the foreground cache after every k epochs (0: never)
    regen: str = "loop"               # CAMs of the rebuild: "loop" from the epoch's batches, "pass" after it
    momentum: float = 0.1             # CAM momentum of the cache update
    canvas: int = 40
    crop: int = 32
    canvas_mode: str = "center"       # center: shorter side resized + centre crop (the authors'); stretch
    augment: str = "crop"             # after the mix: crop (random crop + flip) or rrc (RandomResizedCrop + flip)
    crop_from: str = "canvas"         # rrc's training crops: from the canvas (the authors'), or the whole image
    grid: int = 8
    box_fraction: float = 0.25
    top_k_ratio: float = 0.25
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"                 # CUDA only: auto = bf16 where supported, else fp16
    channels_last: bool = True        # CUDA only
    workers: int = 2
    eval_every: int = 1               # evaluate every k epochs (and always after the last)
    save_every: int = 0               # also save RUN/last.pt every k steps, mid-epoch (0: at epoch ends only)
    on_error: str = "raise"           # an image that does not decode: "raise" or "skip" (and count)
    cache: Optional[str] = None       # cache folder; default RUN/cache
    cache_layout: str = "auto"        # torchrun: one folder all nodes share, or one on each node's disk
    open_test: list = dataclasses.field(default_factory=list)   # folders of unknowns evaluated beside the test folder
    progress: bool = True
    log_every: int = 50               # a log line (loss, img/s, lr, data-wait share) every N steps (0: none)
    log: str = ""                     # comma list of extra sinks: csv (RUN/steps.csv, RUN/epochs.csv), tensorboard
    label_smoothing: float = 0.0
    ema: float = 0.0                  # decay of an EMA of the weights (timm ModelEmaV3); evaluated and best.pt
    clip_grad: float = 0.0            # clip the gradients' global L2 norm to this (0: no clipping)
    sync_bn: bool = False             # under torchrun on CUDA: BatchNorm statistics over all ranks
    auto_augment: str = "none"        # after the mix, on the uint8 crops: trivialaugment or randaugment
    pretrained: Optional[str] = None  # state dict (torch or .safetensors) to start from; the head is new
    mixup: float = 0.0                # timm Mixup alpha (0: no Mixup)
    cutmix: float = 0.0               # timm CutMix alpha (0: no CutMix); with both, half the batches each
    grad_accum_steps: int = 1         # the optimiser steps every N batches, on their mean gradient
    compile: bool = False             # torch.compile the training forward (checkpoints: the plain module's)

    def __post_init__(self) -> None:
        check_arch(self.arch)
        for name, choices in CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                raise BackMixError(f"unknown {option(name)} {value!r} (choose from {', '.join(choices)})")
        check_device_name(self.device)
        for name in NUMERIC_RANGES:
            check_number(name, getattr(self, name))
        self.grad_accum_steps = int(self.grad_accum_steps)   # a config file's 2.0 counts batches as 2 does
        if self.protocol is not None and self.protocol not in PROTOCOLS:
            raise BackMixError(f"unknown --protocol {self.protocol!r} (choose from {', '.join(PROTOCOLS)})")
        if self.protocol and self.splits_file:
            raise BackMixError("--protocol and --splits both name the split list; give one of them")
        if self.protocol in SSB_PROTOCOLS:
            # one split, every known class: the default split number asks for it too
            if str(self.split).strip() not in ("0", "all"):
                raise BackMixError(f"--protocol {self.protocol} trains on every known class, with the unknowns "
                                   f"from its --open-test folders: --split all, not {self.split!r}")
            self.split = "all"
        self.open_test = [str(folder) for folder in self.open_test]
        if self.w_raw == 0 and not (self.backmix and self.w_mix > 0):
            raise BackMixError("--w-raw 0 trains on the mixed images only: it needs BackMix and --w-mix > 0")
        for sink in self.log_sinks:
            if sink not in LOG_SINKS:
                raise BackMixError(f"unknown --log sink {sink!r} (give a comma list of {', '.join(LOG_SINKS)})")
        self.loader_options()   # checks the Ray options
        self.check_loader()

    def check_loader(self) -> None:
        """The loader's options, by the rules of the loaders themselves: the training loader's config as the
        run will build it (``loader_config``), and what the backend refuses of it."""
        try:
            check_backend_config(self.backend, loader_config(self, torch.device("cpu"), train=True))
        except TypeError as e:   # a config file's value of another type: one line, as the others
            raise BackMixError(str(e)) from None

    @property
    def log_sinks(self) -> list[str]:
        return [s.strip() for s in self.log.split(",") if s.strip()]

    @property
    def run_dir(self) -> Path:
        return Path(self.out)

    @property
    def cache_dir(self) -> Path:
        return Path(self.cache) if self.cache else self.run_dir / "cache"

    @property
    def forward_passes(self) -> int:
        """Forward/backward passes per training image (``trainers.methods``)."""
        return forward_passes(self.backmix, self.w_raw, self.views, self.mix_prob)

    @property
    def model_kwargs(self) -> dict:
        # image_size: ViTs and the like are built for the crop side they will see (others ignore it)
        return {"width": self.width} if self.arch == "cnn32" else {"image_size": self.crop}

    def loader_options(self) -> dict:
        """``make_loader``'s backend keyword arguments. The Ray and FFCV options of a run resumed or
        evaluated with another backend are left aside (the command line refuses them with another backend)."""
        if self.backend == "ray":
            return backend_options(self.backend, ray_address=self.ray_address, prefetch=self.prefetch)
        if self.backend == "ffcv":
            return backend_options(self.backend, beton_mode=self.beton_mode, jpeg_quality=int(self.jpeg_quality))
        return {}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise BackMixError(f"config has unknown keys: {', '.join(sorted(unknown))}")
        missing = [k for k in ("canvas_mode", "val_fraction") if k not in d]
        if missing:
            raise BackMixError(f"config was written by an earlier backmix (it has no {missing[0]}): "
                               "`backmix train` writes a run of this one")
        return cls(**d)

    @classmethod
    def load(cls, path: Path) -> "TrainConfig":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise BackMixError(f"cannot read run config {path}: {e}") from None
        except BackMixError as e:
            raise BackMixError(f"run config {path}: {e}") from None


def loader_config(cfg: TrainConfig, device: torch.device, *, train: bool, rank: int = 0,
                  world: int = 1) -> LoaderConfig:
    """The config of a run's training (``train``) or evaluation loader."""
    return LoaderConfig(
        batch_size=cfg.batch_size if train else max(cfg.batch_size, 256),
        canvas=cfg.canvas, crop=cfg.crop, grid=cfg.grid, backmix=cfg.backmix and train,
        canvas_mode=cfg.canvas_mode, augment=cfg.augment, crop_from=cfg.crop_from,
        auto_augment=cfg.auto_augment if train else "none",
        # no clean crops if no loss reads them; a mix probability picks between both
        clean=not (cfg.backmix and train and cfg.w_raw == 0 and cfg.mix_prob is None),
        # given as asked (the loader refuses it without BackMix); evaluation crops are clean
        mix_prob=cfg.mix_prob if train else None, views=cfg.views if train else 1,
        box_fraction=cfg.box_fraction, top_k_ratio=cfg.top_k_ratio, seed=cfg.seed,
        shuffle=train, train=train, rank=rank if train else 0, world_size=world if train else 1,
        last_batch="keep", num_workers=cfg.workers,   # under DDP too: every image once, equal steps per rank
        on_error=cfg.on_error, device=device,
        keep_canvas=False)   # the in-loop rebuild, when it runs, gets the canvases anyway


def field_defaults() -> dict:
    return {f.name: f.default for f in dataclasses.fields(TrainConfig)}
