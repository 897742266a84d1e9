"""The resolved configuration of one training run (written to RUN/config.json)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from backmix.models import check_arch
from backmix.osr_data.errors import BackMixError
from backmix.pipeline.loaders import BACKENDS

OPTIMIZERS = ("sgd", "adamw")
AMP = ("auto", "bf16", "fp16", "off")


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
    split: str = "0"                  # split number 0..4, or comma list of known class names
    backend: str = "reference"
    backmix: bool = True              # False: plain baseline (loss on the raw images only)
    w_raw: float = 1.0                # weight of CE on the clean crops (0 with BackMix: mixed only)
    w_mix: float = 1.0                # weight of CE on the mixed crops
    regen_every: int = 2              # rebuild the foreground cache after every k epochs (0: never)
    momentum: float = 0.1             # CAM momentum of the cache update
    canvas: int = 40
    crop: int = 32
    grid: int = 8
    box_fraction: float = 0.25
    top_k_ratio: float = 0.25
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"                 # CUDA only: auto = bf16 where supported, else fp16
    channels_last: bool = True        # CUDA only
    workers: int = 2
    eval_every: int = 1               # evaluate every k epochs (and always after the last)
    cache: Optional[str] = None       # cache folder; default RUN/cache
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise BackMixError(f"--epochs must be at least 1, got {self.epochs}")
        check_arch(self.arch)
        if self.opt not in OPTIMIZERS:
            raise BackMixError(f"unknown --opt {self.opt!r} (choose from {', '.join(OPTIMIZERS)})")
        if self.backend not in BACKENDS:
            raise BackMixError(f"unknown --backend {self.backend!r} (choose from {', '.join(BACKENDS)})")
        if self.amp not in AMP:
            raise BackMixError(f"unknown --amp {self.amp!r} (choose from {', '.join(AMP)})")
        if self.lr <= 0:
            raise BackMixError(f"--lr must be positive, got {self.lr}")
        if self.width <= 0:
            raise BackMixError(f"--width must be positive, got {self.width}")
        if self.regen_every < 0 or self.eval_every < 0:
            raise BackMixError("--regen-every and --eval-every must be >= 0")
        if not 0.0 <= self.momentum <= 1.0:
            raise BackMixError(f"--momentum (CAM momentum) must lie in [0, 1], got {self.momentum}")
        if self.workers < 0:
            raise BackMixError(f"--workers must be >= 0, got {self.workers}")
        if self.w_raw < 0 or self.w_mix < 0:
            raise BackMixError(f"--w-raw and --w-mix must be >= 0, got {self.w_raw} and {self.w_mix}")
        if self.w_raw == 0 and not (self.backmix and self.w_mix > 0):
            raise BackMixError("--w-raw 0 trains on the mixed images only: it needs BackMix and --w-mix > 0")

    @property
    def run_dir(self) -> Path:
        return Path(self.out)

    @property
    def cache_dir(self) -> Path:
        return Path(self.cache) if self.cache else self.run_dir / "cache"

    @property
    def model_kwargs(self) -> dict:
        # image_size: ViTs and the like are built for the crop side they will see (others ignore it)
        return {"width": self.width} if self.arch == "cnn32" else {"image_size": self.crop}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise BackMixError(f"config has unknown keys: {', '.join(sorted(unknown))}")
        return cls(**d)

    @classmethod
    def load(cls, path: Path) -> "TrainConfig":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise BackMixError(f"cannot read run config {path}: {e}") from None


def field_defaults() -> dict:
    return {f.name: f.default for f in dataclasses.fields(TrainConfig)}
