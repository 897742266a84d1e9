"""Mixed precision of a run: AMP on CUDA, full precision on the CPU."""
from __future__ import annotations

import contextlib

import torch
from torch import nn


class Precision:
    """AMP on CUDA (bf16 where supported, else fp16 with loss scaling); full precision on the CPU."""

    def __init__(self, device: torch.device, amp: str) -> None:
        self.dtype = None
        if device.type == "cuda" and amp != "off":
            bf16 = amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported())
            self.dtype = torch.bfloat16 if bf16 else torch.float16
        self.device = device
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """Add ``loss``'s gradients (scaled under fp16) to those the parameters hold."""
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self, optimizer: torch.optim.Optimizer, clip: float = 0.0) -> None:
        """Step on the gradients the parameters hold; ``clip`` > 0: first clip their global L2 norm to it
        (unscaled)."""
        if clip:
            if self.scaler is not None:
                self.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip)
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()
