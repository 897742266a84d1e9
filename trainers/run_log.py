"""What a run reports while it trains (rank 0): a line every ``--log-every`` steps (loss, img/s, lr,
share of the time spent waiting for data), progress (a tqdm bar on a terminal, else a line every
10 % of an epoch, at most one per 10 s), all of it also in RUN/train.log; with ``--log csv`` the step lines in RUN/steps.csv
and the epochs in RUN/epochs.csv, with ``--log tensorboard`` the same as TensorBoard scalars in
RUN/tensorboard (``torch.utils.tensorboard``; the ``tensorboard`` extra).
"""
from __future__ import annotations

import csv
import importlib.util
import logging
import math
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from tqdm import tqdm

from backmix.osr_data.errors import BackMixError

from .config import TrainConfig
from .open_test import open_test_name
from .run_files import writing

log = logging.getLogger("backmix")
_IMPORTED = time.perf_counter()
_first_batch_logged = False   # once a process: the start-up line
FIRST_BATCH_LINE = "first batch in hand"   # how that line starts (``bench scale`` times it)
STARTUP_BEFORE_IMPORT_S = 120.0   # the most the interpreter and the imports before this module plausibly take
CLOCK_TICK_S = 0.05   # /proc's start time is in clock ticks (10 ms), the clocks read at slightly other moments

STEP_FIELDS = ("epoch", "step", "global_step", "loss", "images_per_s", "lr", "data_wait")
EPOCH_FIELDS = ("epoch", "loss", "train_acc", "images_per_s", "lr", "train_s")
EVAL_FIELDS = ("accuracy", "auroc_msp", "auroc_mls", "auroc_energy", "fpr95_msp", "fpr95_mls", "fpr95_energy",
               "oscr_msp", "oscr_mls", "oscr_energy")
VAL_FIELDS = ("val_accuracy", "val_loss")    # the validation rows' closed-set accuracy (it selects best.pt), loss
OPEN_FIELDS = tuple(f for f in EVAL_FIELDS if f != "accuracy")   # per --open-test set, against the known test images


def open_set_fields(names) -> tuple[str, ...]:
    """The epoch row's columns of the ``--open-test`` sets ``names``: "NAME/auroc_msp", ..."""
    return tuple(f"{name}/{field}" for name in names for field in OPEN_FIELDS)
PROGRESS_LINES = 10   # without a terminal: a progress line every tenth of an epoch,
PROGRESS_SECONDS = 10.0   # but at most one per this many seconds (a short epoch has its epoch line alone)


def process_age() -> float:
    """Seconds since this process started: from /proc on Linux (the interpreter's own start-up
    included), else since this module was imported. /proc counts the start on the boot clock, which
    a container or a resumed machine may see otherwise than this process does: an age shorter than
    the time since the import, or longer than it by more than a start-up could take, is not this
    process's, and the time since the import is said instead."""
    since_import = time.perf_counter() - _IMPORTED
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()   # the name, in parentheses, may hold spaces
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return since_import
    plausible = since_import - CLOCK_TICK_S <= age <= since_import + STARTUP_BEFORE_IMPORT_S
    return age if plausible else since_import


def show_progress(cfg: TrainConfig, rank: int) -> bool:
    """Progress bars: rank 0's, on a terminal, unless --no-progress."""
    return cfg.progress and rank == 0 and sys.stderr.isatty()


def epoch_line(r: dict, epochs: int) -> str:
    """The log line of an epoch's metrics record (RUN/metrics.jsonl)."""
    parts = [f"epoch {r['epoch']}/{epochs}", f"loss {r['loss']:.3f}", f"train acc {r['train_acc']:.3f}",
             f"{r['images_per_s']:.0f} img/s"]
    if r.get("cache_generation") is not None:
        parts.append(f"masks from generation {r['cache_generation']}")
    if "regen_s" in r:
        how = f", {r['regen_in_loop_s']:.1f}s of it CAMs in the loop" if "regen_in_loop_s" in r else ""
        parts.append(f"cache rebuilt in {r['regen_s']:.1f}s (generation {r['regenerated']}{how})")
    if "val" in r:
        parts.append(f"val acc {r['val']['accuracy']:.3f}")
    if "eval" in r:
        e = r["eval"]
        parts.append(f"test acc {e['accuracy']:.3f}" + (f" AUROC {e['auroc_msp']:.3f} OSCR {e['oscr_msp']:.3f}"
                                                      if "auroc_msp" in e else ""))
        parts += [f"vs {name}: AUROC {m['auroc_msp']:.3f} OSCR {m['oscr_msp']:.3f}"
                  for name, m in e.get("open_test", {}).items()]
    return "  ".join(parts)


class RunLog:
    """Rank 0's log sinks of one run; on other ranks (``enabled`` False) every call does nothing."""

    def __init__(self, cfg: TrainConfig, *, enabled: bool) -> None:
        self.cfg, self.enabled = cfg, enabled
        self.open_set_names = [open_test_name(folder) for folder in cfg.open_test]
        self.bar_on_terminal = enabled and show_progress(cfg, 0)
        self._stack = ExitStack()
        self._csv: dict[str, csv.DictWriter] = {}
        self._files: dict = {}
        self.tensorboard = None
        if enabled and "tensorboard" in cfg.log_sinks:
            if importlib.util.find_spec("tensorboard") is None:   # torch.utils.tensorboard writes through it
                raise BackMixError("--log tensorboard needs the tensorboard package: "
                                   "pip install 'backmix[tensorboard]'")

    def open(self, run: Path, first_step: int = 0, first_epoch: int = 0) -> None:
        """Start writing into the run folder (checked writable). A resumed run continues at global
        step ``first_step`` after ``first_epoch`` whole epochs: the CSV rows and TensorBoard events the
        interrupted run logged after that point are dropped (they are logged again), as in metrics.jsonl."""
        if not self.enabled:
            return
        with writing(run / "train.log"):
            handler = logging.FileHandler(run / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
        self._stack.callback(log.removeHandler, handler)
        self._stack.callback(handler.close)
        if "csv" in self.cfg.log_sinks:
            epoch_fields = EPOCH_FIELDS + VAL_FIELDS + EVAL_FIELDS + open_set_fields(self.open_set_names)
            for name, fields in (("steps", STEP_FIELDS), ("epochs", epoch_fields)):
                path = run / f"{name}.csv"
                key, upto = ("global_step", first_step) if name == "steps" else ("epoch", first_epoch)
                with writing(path):
                    kept = [r for r in read_rows(path) if r[key].isdigit() and int(r[key]) <= upto] if first_step else []
                    f = self._stack.enter_context(open(path, "w", newline=""))
                    self._csv[name] = csv.DictWriter(f, fields, restval="", extrasaction="ignore")
                    self._csv[name].writeheader()
                    self._csv[name].writerows(kept)
                self._files[name] = f
        if "tensorboard" in self.cfg.log_sinks:
            from torch.utils.tensorboard import SummaryWriter
            # Step ``first_step`` is in the checkpoint and is not trained again: its events stay, the later
            # ones (logged by the interrupted run after its checkpoint) go, as the CSV rows do.
            with writing(run / "tensorboard"):
                self.tensorboard = SummaryWriter(str(run / "tensorboard"),
                                                 purge_step=first_step + 1 if first_step else None)
            self._stack.callback(self.tensorboard.close)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write(self, name: str, row: dict) -> None:
        if name in self._csv:
            self._csv[name].writerow(row)
            self._files[name].flush()   # readable while the run goes on

    def batch_in_hand(self) -> None:
        """Called with every training batch: the first one this process trains on logs how long the
        start-up took (interpreter, imports, index, cache, model and the loader's first batch)."""
        global _first_batch_logged
        if self.enabled and not _first_batch_logged:
            _first_batch_logged = True
            log.info("%s %.1fs after the process started", FIRST_BATCH_LINE, process_age())

    def steps(self, row: dict) -> None:
        self._write("steps", row)
        if self.tensorboard is not None:
            for key in ("loss", "images_per_s", "lr", "data_wait"):
                self.tensorboard.add_scalar(f"train/{key}", row[key], row["global_step"])

    def epoch_done(self, record: dict) -> None:
        """After RUN/metrics.jsonl took the epoch's line: its numbers in the CSV and TensorBoard sinks."""
        if not self.enabled:
            return
        row = {k: record[k] for k in EPOCH_FIELDS if k in record}
        row.update({f"val_{k}": v for k, v in record.get("val", {}).items() if f"val_{k}" in VAL_FIELDS})
        ev = record.get("eval", {})
        row.update({k: ev[k] for k in EVAL_FIELDS if k in ev})
        for name, metrics in ev.get("open_test", {}).items():
            row.update({f"{name}/{k}": metrics[k] for k in OPEN_FIELDS if k in metrics})
        self._write("epochs", row)
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "epoch":
                    group = ("eval" if key in EVAL_FIELDS else "val" if key in VAL_FIELDS
                             else "open_test" if "/" in key else "epoch")
                    tag = f"val/{key[4:]}" if group == "val" else f"{group}/{key}"
                    self.tensorboard.add_scalar(tag, value, record["epoch"])
            self.tensorboard.flush()

    def epoch(self, epoch: int, steps: int, first_step: int, world: int) -> "EpochProgress":
        return EpochProgress(self, epoch, steps, first_step, world)


def read_rows(path: Path) -> list[dict]:
    """The complete rows of a CSV sink (a row cut short by a kill is left out)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [r for r in rows if None not in r.values() and None not in r]


class EpochProgress:
    """One epoch's step reports. ``step`` is called after every batch (``stepped``: the optimizer stepped
    after it, so ``global_step`` is new: only then a ``--log-every`` line); it reads the loss off the
    device only on the steps that report (a CUDA sync otherwise avoided)."""

    def __init__(self, run_log: RunLog, epoch: int, steps: int, first_step: int, world: int) -> None:
        self.run_log, self.cfg, self.epoch, self.steps, self.world = run_log, run_log.cfg, epoch, steps, world
        self.done = first_step
        self._reset()
        self.bar = tqdm(total=steps, initial=first_step, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", unit="batch",
                        leave=False, disable=not run_log.bar_on_terminal)
        # Log lines printed while the bar is drawn go through tqdm.write, above the bar.
        self._redirect = ExitStack()
        if not self.bar.disable:
            from tqdm.contrib.logging import logging_redirect_tqdm
            self._redirect.enter_context(logging_redirect_tqdm([logging.root]))
        self.progress_lines = run_log.enabled and self.cfg.progress and not run_log.bar_on_terminal
        self.next_line = self._next_tenth(first_step)
        self.last_line = time.perf_counter()

    def _reset(self) -> None:
        self.loss_sum, self.images, self.waited, self.since = None, 0, 0.0, time.perf_counter()

    def _next_tenth(self, done: int) -> int:
        return next((math.ceil(self.steps * k / PROGRESS_LINES) for k in range(1, PROGRESS_LINES + 1)
                     if math.ceil(self.steps * k / PROGRESS_LINES) > done), self.steps + 1)

    def step(self, global_step: int, loss: torch.Tensor, images: int, waited: float, lr: float, *,
             stepped: bool = True) -> None:
        if not self.run_log.enabled:
            return
        self.done += 1
        loss = loss.detach().double() * images
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.images += images
        self.waited += waited
        every = self.cfg.log_every
        report = stepped and bool(every) and global_step % every == 0
        line = self.progress_lines and self.done >= self.next_line
        if line and time.perf_counter() - self.last_line < PROGRESS_SECONDS:
            line, self.next_line = False, self._next_tenth(self.done)   # this tenth came too soon: skipped
        postfix = not self.bar.disable and (self.bar.n + 1) % 10 == 0
        if not (report or line or postfix):
            self.bar.update(1)
            return
        seconds = max(time.perf_counter() - self.since, 1e-9)
        row = {"epoch": self.epoch + 1, "step": self.done, "global_step": global_step,
               "loss": self.loss_sum.item() / max(1, self.images), "images_per_s": self.images * self.world / seconds,
               "lr": lr, "data_wait": min(1.0, self.waited / seconds)}
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{row['loss']:.3f}", img_s=f"{row['images_per_s']:.0f}")
        if report or line:
            where = f"{self.done}/{self.steps}" + (f" ({100 * self.done // self.steps}%)" if line else "")
            log.info("epoch %d/%d step %s: loss %.4f  %.0f img/s  lr %.4g  data wait %.0f%%", self.epoch + 1,
                     self.cfg.epochs, where, row["loss"], row["images_per_s"], lr, 100 * row["data_wait"])
            self.next_line = self._next_tenth(self.done)
            self.last_line = time.perf_counter() if line else self.last_line
        if report:
            self.run_log.steps(row)
            self._reset()

    def close(self) -> None:
        self._redirect.close()
        self.bar.close()
