"""The one device choice of every stage (command lines, loaders, the CAM pass, the benchmarks).

A device is named once, as "auto", "cpu", "cuda" or "cuda:N" (or given as a ``torch.device``);
``parse_device`` reads the name and every stage passes the ``torch.device`` on as it is, so a
loader's GPU is the one named, not whichever ``torch.cuda.set_device`` chose last.

It lives in the package root, below the stages, so ``cam_cache`` can use it without importing
``pipeline`` (data flows one way: osr_data -> cam_cache -> pipeline -> trainers). Importing it does
not import torch: the command lines check ``--device`` with it, and ``backmix --help`` stays fast.
"""
from __future__ import annotations

import argparse
import functools
import logging
import re
from typing import TYPE_CHECKING, Optional

from backmix.osr_data.errors import BackMixError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("backmix")

DEVICE_NAMES = "auto, cpu, cuda or cuda:N"
DEVICE_HELP = "auto (a GPU when there is one), cpu, cuda (the current GPU) or cuda:N"
_NAME = re.compile(r"(auto|cpu|cuda(:[0-9]+)?)\Z")


def check_device_name(name: str) -> str:
    """``name`` when it names a device ("auto", "cpu", "cuda", "cuda:N"), else one line."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise BackMixError(f"device must be {DEVICE_NAMES}, got {name!r}")
    return name


def device_option(name: str) -> str:
    """The type of the command lines' ``--device``: a wrong name is argparse's one-line usage error."""
    try:
        return check_device_name(name)
    except BackMixError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_device(request: "str | torch.device") -> "torch.device":
    """The ``torch.device`` that ``request`` names, without asking CUDA for it: "auto" is a CUDA
    device when there is one, else the CPU; "cuda" (index None) is the current CUDA device when
    ``choose_device`` takes it; "cuda:N" and a ``torch.device`` of the CPU or CUDA are as they are."""
    import torch

    if isinstance(request, torch.device):
        if request.type not in ("cpu", "cuda"):
            raise BackMixError(f"device must be {DEVICE_NAMES}, got {request!r}")
        return request
    if not isinstance(request, str):
        raise TypeError(f"device must be a str ({DEVICE_NAMES}) or a torch.device, not {type(request).__name__}")
    if check_device_name(request) == "auto":
        request = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(request)


def choose_device(request: "str | torch.device" = "auto", cuda_index: Optional[int] = None) -> "torch.device":
    """The device ``request`` names (``parse_device``), which must exist on this machine. The CUDA
    device of "auto" and "cuda" is ``cuda_index`` (a process's local rank), default the current one.
    Logs the choice once a process."""
    import torch

    dev = parse_device(request)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BackMixError("--device cuda was asked for, but CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device() if cuda_index is None else cuda_index)
        if dev.index >= torch.cuda.device_count():
            raise BackMixError(f"--device {dev} was asked for, but this machine has "
                               f"{torch.cuda.device_count()} CUDA device(s)")
    announce_device(str(dev))
    return dev


@functools.lru_cache(maxsize=None)
def announce_device(name: str) -> None:
    """Logs the device once a process: a trainer's loaders and its cache rebuild share it."""
    log.info("mixing on %s", name)
