"""The one device choice of every stage (loaders, the CAM pass, the benchmarks).

It lives in the package root, below the stages, so ``cam_cache`` can use it without importing
``pipeline`` (data flows one way: osr_data -> cam_cache -> pipeline -> trainers).
"""
from __future__ import annotations

import functools
import logging
from typing import Optional

import torch

from backmix.osr_data.errors import BackMixError

log = logging.getLogger("backmix")


def choose_device(request: str | torch.device = "auto", cuda_index: Optional[int] = None) -> torch.device:
    """"auto": a CUDA device when there is one, else the CPU; "cpu"; "cuda": a CUDA device, which must
    exist; a device named in full ("cuda:1", a ``torch.device``) as it is. The CUDA device of "auto" and
    "cuda" is ``cuda_index`` (a process's local rank), default the current one. Logs the choice once a
    process."""
    if isinstance(request, str) and request == "auto":
        request = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(request)
    except (RuntimeError, TypeError):
        raise BackMixError(f"device must be auto, cpu, cuda or cuda:N, got {request!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BackMixError("--device cuda was asked for, but CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device() if cuda_index is None else cuda_index)
    announce_device(str(dev))
    return dev


@functools.lru_cache(maxsize=None)
def announce_device(name: str) -> None:
    """Logs the device once a process: a trainer's loaders and its cache rebuild share it."""
    log.info("mixing on %s", name)
