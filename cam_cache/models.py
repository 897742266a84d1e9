"""The classifiers whose class activation maps the cache knows how to take.

Each is a feature extractor, global average pooling and one linear layer, so
CAM_c = sum_k w_ck * F_k (Zhou et al. 2016). ``features_and_head`` exposes the
two halves; a model without that head is refused with a clear error.
The trainer builds its models here, so a checkpoint the trainer writes is one
the cache builder can read.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn
from torchvision.models import ResNet, resnet18, resnet50

from backmix.osr_data.errors import BackMixError
from backmix.osr_data.index import atomic_file

ARCHS = ("cnn32", "resnet18", "resnet50")


class Classifier32(nn.Module):
    """The 9-layer CNN of the OSR literature for 32 px images (Neal et al. 2018; ARPL).

    ``width`` scales the channels (64/128 at 1.0) so that small CPU runs stay quick.
    """

    def __init__(self, num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        c1, c2 = max(8, int(64 * width)), max(16, int(128 * width))

        def block(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2)]

        self.features = nn.Sequential(
            nn.Dropout2d(0.2),
            *block(3, c1, 1), *block(c1, c1, 1), *block(c1, c2, 2), nn.Dropout2d(0.2),
            *block(c2, c2, 1), *block(c2, c2, 1), *block(c2, c2, 2), nn.Dropout2d(0.2),
            *block(c2, c2, 1), *block(c2, c2, 1), *block(c2, c2, 2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def build_model(arch: str, num_classes: int, **kwargs) -> nn.Module:
    if arch == "cnn32":
        return Classifier32(num_classes, **kwargs)
    if arch == "resnet18":
        return resnet18(num_classes=num_classes)
    if arch == "resnet50":
        return resnet50(num_classes=num_classes)
    raise BackMixError(f"unknown model {arch!r} (choose from {', '.join(ARCHS)})")


def features_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """(module giving the last feature map [B, C, h, w], the linear layer after global pooling)."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    if isinstance(model, ResNet):
        body = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool,
                             model.layer1, model.layer2, model.layer3, model.layer4)
        return body, model.fc
    if isinstance(getattr(model, "features", None), nn.Module) and isinstance(getattr(model, "fc", None), nn.Linear):
        return model.features, model.fc
    raise BackMixError(f"cannot take CAMs of {type(model).__name__}: it needs a global-pooling and "
                       "linear head (a torchvision ResNet, or .features then pooling then .fc)")


def save_checkpoint(path: str | os.PathLike, model: nn.Module, *, arch: str, num_classes: int,
                    model_kwargs: dict | None = None, **extra) -> Path:
    """Atomically write {arch, num_classes, model_kwargs, state_dict, **extra}."""
    state = getattr(model, "module", model).state_dict()
    with atomic_file(path) as tmp:
        torch.save({"arch": arch, "num_classes": num_classes, "model_kwargs": model_kwargs or {},
                    "state_dict": state, **extra}, tmp)
    return Path(path)


def read_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise BackMixError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for a bad file
        raise BackMixError(f"checkpoint {path} is not a readable torch checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or not {"arch", "num_classes", "state_dict"} <= set(ckpt):
        raise BackMixError(f"checkpoint {path} was not written by backmix (no arch/num_classes/state_dict)")
    return ckpt


def load_model(path: str | os.PathLike, *, arch: str | None = None,
               num_classes: int | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model of a checkpoint; ``arch``/``num_classes`` given are checked against it."""
    ckpt = read_checkpoint(path)
    if arch is not None and ckpt["arch"] != arch:
        raise BackMixError(f"checkpoint {path} holds a {ckpt['arch']} model, not {arch}")
    if num_classes is not None and ckpt["num_classes"] != num_classes:
        raise BackMixError(f"checkpoint {path} has {ckpt['num_classes']} classes, the data has {num_classes}")
    model = build_model(ckpt["arch"], ckpt["num_classes"], **ckpt.get("model_kwargs", {}))
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError:
        raise BackMixError(f"checkpoint {path}: weights do not fit a {ckpt['arch']} "
                           f"with {ckpt['num_classes']} classes") from None
    return model, ckpt


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
