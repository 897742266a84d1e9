"""``backmix eval``: the open-set metrics of a saved checkpoint on a data set's test folder (of the weights its
run evaluated: an --ema run's checkpoint is scored with its EMA weights, as the run reported it)."""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional

from backmix.models import load_model, read_checkpoint
from backmix.osr_data.errors import BackMixError
from backmix.osr_data.open_set import load_data
from backmix.osr_data.protocols import SSB_PROTOCOLS, protocol
from backmix.osr_data.splits import OpenSetSplit
from backmix.pipeline.loaders import make_loader

from .config import TrainConfig
from .distributed import init_distributed
from .epoch import evaluate
from .open_test import open_test_indexes
from .precision import Precision
from .run_data import loader_config, open_test_loaders

log = logging.getLogger("backmix")


def evaluate_checkpoint(checkpoint: str | os.PathLike, data_root: str | os.PathLike, *,
                        backend: str = "reference", split: Optional[str] = None, device: str = "auto",
                        workers: int = 2, progress: bool = True, on_error: str = "raise",
                        canvas_mode: Optional[str] = None, open_test: tuple[str, ...] = ()) -> dict:
    """Open-set metrics of a checkpoint on ``data_root``/test; the known classes come from the checkpoint."""
    ckpt = read_checkpoint(checkpoint)
    saved = ckpt.get("config") or {}
    if split is not None:
        data = load_data(data_root, split)
        if ckpt.get("known_classes") and tuple(ckpt["known_classes"]) != data.split.known:
            raise BackMixError(f"checkpoint {checkpoint} was trained on known classes "
                               f"{', '.join(ckpt['known_classes'])}, not split {split} ({', '.join(data.split.known)}); "
                               "leave --split out to evaluate on its own")
    elif ckpt.get("known_classes"):
        data = load_data(data_root, OpenSetSplit(tuple(ckpt["known_classes"]), ()))
    else:
        raise BackMixError(f"checkpoint {checkpoint} does not name its known classes; pass --split")
    # the run's published sets of unknowns: an --open-test folder named after one must hold its classes
    published = protocol(saved["protocol"]) if saved.get("protocol") in SSB_PROTOCOLS else None
    open_sets = open_test_indexes(list(open_test), (data.train, data.test), published)
    model, _ = load_model(checkpoint, num_classes=data.num_known)
    use_ema_weights(model, ckpt, checkpoint)
    given = {"backend": backend, "device": device, "workers": workers, "progress": progress, "on_error": on_error,
             "auto_augment": "none",   # evaluation never augments: any backend takes the checkpoint
             **({"canvas_mode": canvas_mode} if canvas_mode else {})}
    try:
        cfg = TrainConfig.from_dict({**saved, **given}) if saved else TrainConfig(**given)
    except BackMixError as e:
        if not saved:
            raise
        TrainConfig(**given)   # a value the user gave is refused here, in its own words; else the file's is
        raise BackMixError(f"checkpoint {checkpoint}: its config: {e}") from None
    dev, _, _ = init_distributed(device)
    model.to(dev)
    loader = make_loader(cfg.backend, data.test, loader_config(cfg, dev, train=False), **cfg.loader_options())
    return evaluate(model, loader, data.label_map, Precision(dev, cfg.amp),
                    progress and sys.stderr.isatty(), open_test_loaders(cfg, dev, open_sets))


def use_ema_weights(model, ckpt: dict, checkpoint: str | os.PathLike) -> None:
    """A checkpoint of an --ema run holds the raw weights (what --resume trains on) and their EMA, which
    is what the run evaluated and reported for that file (summary.json's last.pt): eval scores the same."""
    ema = ckpt.get("ema_state_dict")
    if ema is None:
        return
    try:
        model.load_state_dict(ema)
    except (RuntimeError, TypeError, AttributeError):
        raise BackMixError(f"checkpoint {checkpoint}: its EMA weights (ema_state_dict) do not fit its model") from None
    log.info("scoring the EMA weights of %s (the weights its run evaluated)", checkpoint)
