"""One training epoch, and evaluation: the two loops of a run.

``train_one_epoch`` is one pass over the BackMix loader; ``predict`` and ``evaluate`` run a model
over an evaluation loader and score it as an open-set recogniser (``trainers.metrics``).
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .accumulation import Accumulation
from .config import TrainConfig
from .distributed import all_reduce_sum
from .metrics import open_set_metrics
from .precision import Precision
from .recipe import Recipe
from .run_log import RunLog


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Dropout's randomness is a pure function of (seed, epoch, rank), so a resumed run repeats it."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def train_one_epoch(model: nn.Module, loader, optimizer, scheduler, cfg: TrainConfig, precision: Precision,
                    epoch: int, *, rank: int = 0, world: int = 1, partial: Optional[dict] = None,
                    save: Optional[Callable[[dict], None]] = None, recipe: Optional[Recipe] = None,
                    run_log: Optional[RunLog] = None, forward: Optional[nn.Module] = None,
                    recorder=None) -> dict:
    """One pass over the loader; loss = w_raw * CE(clean) + w_mix * CE(mixed) (``BackMixBatch.loss``);
    train accuracy is on the first part the batch has.

    partial: this rank's part of a mid-epoch checkpoint (loader position, running sums, seconds, RNG):
    the epoch continues where it was cut. save(partial) is called every ``cfg.save_every`` steps
    (not at an epoch's last step: the epoch's own checkpoint follows). ``recorder``: a rebuild epoch's
    in-loop rebuild, started (``backmix.cam_cache.recorder``), handed each batch before its step.
    ``recipe``: label smoothing, Mixup/CutMix and the EMA (default: plain cross-entropy);
    ``run_log``: the step lines and progress (default: a progress bar on a terminal); ``forward``: the
    module the forward calls (default ``model``; e.g. ``torch.compile(model)``, the same parameters)."""
    model.train()
    loader.set_epoch(epoch)
    device = precision.device
    recipe = recipe or Recipe(cfg, 0)
    run_log = run_log or RunLog(cfg, enabled=rank == 0)
    sums = torch.zeros(3, dtype=torch.float64, device=device)   # loss * n, correct, n
    before = 0.0                                                 # seconds of the epoch before a resume
    if partial:
        loader.load_state_dict(partial["loader"])
        sums = torch.tensor(partial["sums"], dtype=torch.float64, device=device)
        before = partial["train_s"]
        torch.set_rng_state(partial["torch_rng"])
    else:
        torch.manual_seed(epoch_seed(cfg.seed, epoch, rank))
    start = time.perf_counter()
    first = partial["loader"]["step"] if partial else 0
    progress = run_log.epoch(epoch, len(loader), first, world)
    windows = Accumulation(cfg.grad_accum_steps, len(loader))
    forward = model if forward is None else forward
    ready = time.perf_counter()
    for i, batch in enumerate(loader, first):
        waited = time.perf_counter() - ready   # the share of the step spent waiting for data
        run_log.batch_in_hand()
        if recorder is not None:   # its CAMs with the weights of the step that trains on the batch
            recorder.record(batch)
        # One forward over the clean and the mixed crops (BatchNorm sees both together).
        x, targets = recipe.inputs(batch, epoch, scheduler.last_epoch)
        n = batch.labels.shape[0]
        if cfg.channels_last and device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with windows.sync(model, i), precision.autocast():
            logits = forward(x)
            loss = batch.loss(recipe.criterion, logits, clean=cfg.w_raw, mixed=cfg.w_mix, targets=targets)
        if windows.starts(i):
            optimizer.zero_grad(set_to_none=True)
        with windows.sync(model, i):   # DDP decides in the forward; a compiled backward, in the backward
            precision.backward(loss * windows.share(i))
        stepped = windows.steps(i)
        if stepped:
            precision.step(optimizer, cfg.clip_grad)
            scheduler.step()
            recipe.after_step(model, scheduler.last_epoch)
        with torch.no_grad():
            sums += torch.stack([loss.detach().double() * n,
                                 (logits[:n].argmax(1) == batch.labels).sum().double(),
                                 torch.tensor(float(n), dtype=torch.float64, device=device)])
        progress.step(scheduler.last_epoch, loss, n, waited, optimizer.param_groups[0]["lr"], stepped=stepped)
        position = loader.state_dict()
        # Saved at a window's end only: there the optimizer's state alone holds the past batches, so
        # a resume repeats the batches of a window that was cut (the same numbers again) instead of
        # storing a window's gradients, a second copy of the weights' size, in every checkpoint.
        if stepped and save is not None and cfg.save_every and scheduler.last_epoch % cfg.save_every == 0 \
                and position["step"] < len(loader):
            save({"loader": position, "sums": sums.tolist(), "torch_rng": torch.get_rng_state(),
                  "train_s": before + time.perf_counter() - start})
        ready = time.perf_counter()
    progress.close()
    seconds = before + time.perf_counter() - start
    all_reduce_sum(sums, world)
    loss_sum, correct, count = sums.tolist()
    return {"loss": loss_sum / max(1.0, count), "train_acc": correct / max(1.0, count),
            "images": int(count), "images_per_s": count / max(seconds, 1e-9), "train_s": seconds,
            "lr": optimizer.param_groups[0]["lr"]}


@torch.no_grad()
def predict(model: nn.Module, loader, precision: Precision, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 logits [N, K], dataset labels [N]) over the loader, in its order."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for batch in tqdm(loader, desc="evaluate", unit="batch", leave=False, disable=not progress):
        with precision.autocast():
            logits.append(model(batch.images).float().cpu())
        labels.append(batch.dataset_labels)
    model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def evaluate(model: nn.Module, loader, label_map: np.ndarray, precision: Precision,
             progress: bool = False, open_sets: Optional[dict] = None) -> dict:
    """Closed-set accuracy on known-class test images and open-set metrics vs unknown-class ones;
    ``open_sets`` ({name: loader} of ``--open-test`` folders): the same metrics against each, under
    ``"open_test"``."""
    logits, labels = predict(model, loader, precision, progress)
    mapped = torch.from_numpy(label_map)[labels]
    known = mapped >= 0
    metrics = open_set_metrics(logits[known], mapped[known], logits[~known])
    if open_sets:
        metrics["open_test"] = {name: open_set_metrics(logits[known], mapped[known],
                                                       predict(model, other, precision, progress)[0])
                                for name, other in open_sets.items()}
    return metrics
