"""Gradient accumulation (``--grad-accum-steps N``): the optimiser steps once every N batches.

The batches of an epoch fall into windows of N (the last one shorter when N does not divide the
epoch); each batch's loss is divided by its window's size before the backward, so a window's
gradient is the mean over its batches, as one batch of their combined size would give (less the
batch-dependent statistics of BatchNorm). The schedule, the EMA, ``--log-every`` and ``--save-every``
count optimiser steps; so does the key of a batch's Mixup/CutMix draw (``Recipe.inputs``), so a
window's batches share one draw, as the images of one large batch do. Under DDP the gradients are
all-reduced once a window, on its last batch (``no_sync`` on the others).
"""
from __future__ import annotations

import contextlib

from torch import nn


def optimizer_steps(batches: int, accumulate: int) -> int:
    """Optimiser steps of an epoch of ``batches`` batches: one a window, a short last window included."""
    return -(-batches // accumulate)


class Accumulation:
    """The windows of one epoch of ``batches`` batches, ``accumulate`` batches each; batch ``i`` is its
    position in the epoch (0-based)."""

    def __init__(self, accumulate: int, batches: int) -> None:
        self.accumulate, self.batches = accumulate, batches

    def starts(self, i: int) -> bool:
        """The window's first batch: the gradients of the previous one are cleared before its backward."""
        return i % self.accumulate == 0

    def steps(self, i: int) -> bool:
        """The window's last batch, after which the optimiser steps."""
        return (i + 1) % self.accumulate == 0 or i + 1 == self.batches

    def share(self, i: int) -> float:
        """The factor of batch ``i``'s loss: 1 / the size of its window."""
        start = i - i % self.accumulate
        return 1.0 / min(self.accumulate, self.batches - start)

    def sync(self, model: nn.Module, i: int):
        """The context of batch ``i``'s forward and backward: DDP's ``no_sync`` but on a window's last batch."""
        if self.steps(i) or not hasattr(model, "no_sync"):
            return contextlib.nullcontext()
        return model.no_sync()
