"""The standard ImageNet recipe around a BackMix step: label smoothing, Mixup/CutMix (timm), an EMA
of the weights (timm ``ModelEmaV3``), SyncBatchNorm and starting from pretrained weights in a file.

Gradient clipping is ``Precision.step``'s (it must unscale fp16 gradients first); TrivialAugment
and RandAugment are the loader's (``pipeline.augment.AutoAugment``, on the uint8 crops).
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from backmix.models.zoo import unwrap
from backmix.osr_data.errors import BackMixError
from backmix.osr_data.limits import check_regular_file

from .config import TrainConfig

log = logging.getLogger("backmix")


class Recipe:
    """What a training step adds to the plain BackMix loss: the criterion (with label smoothing),
    Mixup/CutMix of each part of the batch (clean, mixed) into soft targets, and the EMA update."""

    def __init__(self, cfg: TrainConfig, num_classes: int, model: Optional[nn.Module] = None) -> None:
        self.seed = cfg.seed
        if ((cfg.mixup or cfg.cutmix) and num_classes < 2) or (cfg.ema and model is None):
            raise ValueError("Mixup/CutMix need the class count and an EMA the model: Recipe(cfg, num_classes, model)")
        self.criterion = nn.CrossEntropyLoss(label_smoothing=0.0 if cfg.mixup or cfg.cutmix else cfg.label_smoothing)
        self.mixup = None
        if cfg.mixup or cfg.cutmix:
            from timm.data import Mixup
            # timm smooths the soft targets itself; the criterion then reads probabilities as they are.
            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                               num_classes=num_classes)
        self.ema = None
        if cfg.ema:
            from timm.utils import ModelEmaV3
            self.ema = ModelEmaV3(unwrap(model), decay=cfg.ema)

    def inputs(self, batch, epoch: int, step: int) -> tuple[Tensor, Optional[Tensor]]:
        """(x, soft targets or None) of one forward pass over ``batch.inputs()``: with Mixup/CutMix,
        each part is mixed within itself (a clean crop never with a mixed one), so ``batch.loss``
        keeps the clean/mixed weights."""
        x, _ = batch.inputs()
        if self.mixup is None:
            return x, None
        n = batch.labels.shape[0]
        # timm draws lambda and the boxes from numpy's global generator: seeded by the step and put back,
        # so a batch's mix is a pure function of (seed, epoch, step) and a resumed run repeats it.
        saved = np.random.get_state()
        np.random.seed(np.random.SeedSequence([self.seed, epoch, step, 0x313]).generate_state(1)[0])
        try:
            mixed = [self._mix_part(part, batch.labels) for part in x.split(n)]
        finally:
            np.random.set_state(saved)
        return torch.cat([p for p, _ in mixed]), torch.cat([t for _, t in mixed])

    def _mix_part(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        from timm.data.mixup import mixup_target
        x = x.clone()   # timm mixes in place
        even = x.shape[0] - x.shape[0] % 2   # timm mixes pairs: an odd last image keeps its own (smoothed) label
        soft = [self.mixup(x[:even], labels[:even])[1]] if even else []
        if even < x.shape[0]:
            soft.append(mixup_target(labels[even:], self.mixup.num_classes, smoothing=self.mixup.label_smoothing))
        return x, torch.cat(soft)

    def after_step(self, model: nn.Module, global_step: int) -> None:
        if self.ema is not None:
            self.ema.update(unwrap(model), step=global_step)

    def eval_model(self, model: nn.Module) -> nn.Module:
        """The weights evaluated and saved as best.pt: the EMA's, else the model's own."""
        return self.ema.module if self.ema is not None else unwrap(model)


def sync_batchnorm(cfg: TrainConfig, model: nn.Module, device: torch.device, world: int) -> nn.Module:
    """--sync-bn: BatchNorm layers that reduce their statistics over every rank (before DDP wraps them)."""
    if not cfg.sync_bn:
        return model
    if world == 1:
        log.info("--sync-bn: one process, so BatchNorm is already over the whole batch")
        return model
    if device.type != "cuda":
        raise BackMixError("--sync-bn needs CUDA (torch's SyncBatchNorm runs on GPUs only); drop it on the CPU")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def head_name(model: nn.Module) -> str:
    """Name of the classifier layer: timm's ``get_classifier()``, else the last ``nn.Linear``."""
    head = model.get_classifier() if callable(getattr(model, "get_classifier", None)) else None
    names = [name for name, m in model.named_modules() if (m is head if head is not None else isinstance(m, nn.Linear))]
    if not names:
        raise BackMixError(f"--pretrained: {type(model).__name__} has no linear head to replace")
    return names[-1]


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a state dict file: ``.safetensors``, or a torch file read with ``weights_only``
    (never unpickling objects), holding the state dict itself or under ``state_dict``/``model``."""
    path = check_regular_file(path, "--pretrained")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # torch and safetensors raise many types for a bad or unsafe file
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise BackMixError(f"--pretrained {path} is not a state dict of tensors ({type(e).__name__}"
                           f"{': ' + first[:120] if first else ''})") from None
    if isinstance(state, dict) and not all(isinstance(v, Tensor) for v in state.values()):
        state = next((state[k] for k in ("state_dict", "model") if isinstance(state.get(k), dict)), state)
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise BackMixError(f"--pretrained {path} holds no state dict of tensors "
                           "(save one with torch.save(model.state_dict(), path))")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> int:
    """Load every weight of ``path`` but the classifier head, which keeps its fresh initialisation for
    the known classes; any other missing, extra or misshapen weight is refused. Returns the count loaded."""
    state = read_state_dict(path)
    head = head_name(model) + "."
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(head)}
    extra = sorted(set(state) - set(own))
    missing = sorted(k for k in own if k not in state and not k.startswith(head)
                     and not k.endswith("num_batches_tracked"))
    misshapen = sorted(k for k in state if k in own and state[k].shape != own[k].shape)
    for problem, keys in (("has weights the model lacks", extra), ("lacks weights of the model", missing),
                          ("has weights of another shape", misshapen)):
        if keys:
            raise BackMixError(f"--pretrained {path} {problem} ({len(keys)}, e.g. {keys[0]}): "
                               f"is it a {type(model).__name__} of this --arch?")
    model.load_state_dict(state, strict=False)
    log.info("started from %d weights of %s (head %s new for the known classes)", len(state), path, head[:-1])
    return len(state)
