"""Checkpoints: {arch, num_classes, model_kwargs, state_dict, ...}, rebuilt by ``load_model``.

The arch string is what ``build_model`` was given (``wrn40_4``, ``timm:resnet18``, ...), so a
checkpoint of any model the trainer builds is one the cache builder and ``backmix eval`` can read.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from backmix.osr_data.errors import BackMixError
from backmix.osr_data.index import atomic_file

from .zoo import build_model


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
