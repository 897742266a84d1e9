"""Train a closed-set classifier with BackMix and evaluate it as an open-set recogniser.

Plain functions over ``TrainConfig``, in the style of torchvision's reference ``train.py``:
``main`` sets up the process (``distributed``) and the run folder (``run_files``, ``run_lock``),
``run`` builds the data, model and optimiser and loops ``run_epoch``, whose steps are
``epoch.train_one_epoch`` and ``epoch.evaluate``; checkpoints and ``--resume`` are ``resume``'s.

Order of one epoch e (0-based): train, evaluate, save RUN/last.pt, append the
epoch's line to RUN/metrics.jsonl. When e+1 is a multiple of ``regen_every``
(and not the last epoch) the epoch also rebuilds the foreground cache:
``--regen loop`` (default) takes each batch's CAMs as it trains, ``--regen pass``
decodes the data again after the epoch; either way every rank stages its shard
(``backmix.cam_cache.rebuild``), then the checkpoint is saved (recording the generation the rebuild
publishes), then rank 0 publishes. A run killed before the checkpoint repeats the
epoch on ``--resume`` from its last checkpoint (same weights, same masks, so the same
in-loop CAMs); one killed after it publishes the shards on disk. The stream of masks stays what it
would have been (see ``backmix.cam_cache.precompute``).
With ``--save-every N``, last.pt is also written every N steps inside an epoch
("partial": each rank's loader position, running sums and RNG), and ``--resume``
continues from that step: on the CPU the result equals the uninterrupted run's bit
for bit. In a ``--regen loop`` rebuild epoch each such save also writes the CAMs
each rank recorded so far beside last.pt (``in_loop_cams``), so a resume continues
that epoch's rebuild too, and publishes the uninterrupted run's generation.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import time
from typing import Optional

import torch

from backmix.models import build_model, features_and_head, load_model, unwrap
from backmix.osr_data.limits import check_regular_file
from backmix.osr_data.open_set import OpenSetData

from .accumulation import optimizer_steps
from .cache_rebuild import finish_pending_rebuild, loop_recorder, rebuild_due, stage_pass
from .config import TrainConfig
from .methods import method_name
from .distributed import barrier, close_distributed, gather_weight_digests, init_distributed, wrap_ddp
from .epoch import evaluate, predict, train_one_epoch
from .in_loop_cams import InLoopCams
from .optim import build_optimizer, build_scheduler
from .precision import Precision
from .recipe import Recipe, load_pretrained, sync_batchnorm
from .resume import (RunCheckpoints, RunProgress, Training, check_resumable, restore_training, resume_config,
                     save_epoch_checkpoints, save_mid_epoch)
from .run_data import RunLoaders, build_loaders, data_fingerprint, load_run_data, open_cache
from .run_files import (append_jsonl, check_new_run, check_out_outside_data, check_run_folder, write_json,
                        write_jsonl, write_run_config)
from .run_lock import hold_run_folder
from .run_log import RunLog, epoch_line, show_progress
from .selection import best_epoch, run_summary, summary_line, validation_metrics

log = logging.getLogger("backmix")


def main(cfg: TrainConfig, *, resume: bool = False, explicit: Optional[set[str]] = None) -> dict:
    """Train (or resume) one run; returns the final evaluation metrics (rank 0; {} on other ranks)."""
    if resume:
        cfg = resume_config(cfg, explicit or set())
    elif cfg.pretrained:
        check_regular_file(cfg.pretrained, "--pretrained")   # before any work
    device, rank, world = init_distributed(cfg.device)
    deterministic = torch.are_deterministic_algorithms_enabled()
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    else:
        torch.backends.cudnn.benchmark = True
    try:
        made_here = not cfg.run_dir.exists()
        if rank == 0:
            check_out_outside_data(cfg)
            check_run_folder(cfg.run_dir)
        # the folder is held (a second run into it is refused) before anything is written there
        with hold_run_folder(cfg.run_dir, made_here) if rank == 0 else contextlib.nullcontext():
            with RunLog(cfg, enabled=rank == 0) as run_log:
                return run(cfg, device, rank, world, resume, run_log)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        close_distributed(world)


def run(cfg: TrainConfig, device: torch.device, rank: int, world: int, resume: bool, run_log: RunLog) -> dict:
    """The run in ``cfg.run_dir``, its folder held: returns the final evaluation (rank 0; {} elsewhere)."""
    data, open_sets = load_run_data(cfg)
    if rank == 0 and not data.split.unknown and not open_sets:
        log.info("every class is known (--split all) and no --open-test folder is given: a closed-set run, "
                 "reporting accuracy only")
    fingerprint = data_fingerprint(data)
    if rank == 0:
        check_new_run(cfg.run_dir, resume)
        check_run_folder(cfg.run_dir)
    barrier(world)
    model, ckpt = model_to_train(cfg, data, fingerprint, resume)
    if rank == 0:   # only now: a resume refused above leaves the run's config as it was
        write_run_config(cfg.run_dir, cfg)
        run_log.open(cfg.run_dir, *((ckpt["scheduler"]["last_epoch"], ckpt["epoch"]) if resume else ()))
    model.to(device)
    if cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    maps = open_cache(cfg, data, rank, world)
    loaders = build_loaders(cfg, data, device, maps, rank, world, open_sets)
    with contextlib.closing(loaders):   # the workers stop however the run ends
        training = training_objects(cfg, model, data.num_known, device, world,
                                     steps_per_epoch=optimizer_steps(len(loaders.train), cfg.grad_accum_steps))
        checkpoints = RunCheckpoints(cfg.run_dir, cfg, data.num_known, data.split.known, fingerprint)
        progress = RunProgress()
        if resume:
            progress = restore_training(training, ckpt, rank=rank, world=world, path=cfg.run_dir / "last.pt")
            if not (progress.partial or {}).get("in_loop"):   # what a kill after a rebuild epoch's end left
                InLoopCams(cfg.run_dir, rank, world).finish()
            if cfg.backmix and ckpt.get("regen_pending"):
                finish_pending_rebuild(cfg, training.model, data, device, maps, ckpt, progress, cfg.run_dir, rank)
        if rank == 0:
            write_jsonl(cfg.run_dir / "metrics.jsonl", progress.history)
            if resume:
                log.info("resuming %s at epoch %d/%d%s", cfg.run_dir, progress.start + 1, cfg.epochs,
                         f", step {progress.partial['loader']['step'] + 1}" if progress.partial else "")
        final: dict = progress.history[-1].get("eval", {}) if progress.history else {}
        first, t_run = progress.start, time.perf_counter()
        for epoch in range(progress.start, cfg.epochs):
            record = run_epoch(cfg, epoch, training, data, loaders, checkpoints, progress, rank=rank, world=world,
                               run_log=run_log)
            final = record.get("eval", final)
            progress.history.append(record)
            if rank == 0:
                append_jsonl(cfg.run_dir / "metrics.jsonl", record)
                log.info("%s", epoch_line(record, cfg.epochs))
                run_log.epoch_done(record)
        if rank != 0:
            return {}
        log.info("trained %d epochs in %.1fs", cfg.epochs - first, time.perf_counter() - t_run)
        write_summary(cfg, progress.history, final, data, loaders, training.precision, device)
        return final


def model_to_train(cfg: TrainConfig, data: OpenSetData, fingerprint: str, resume: bool) -> tuple:
    """(model, checkpoint): fresh (seeded, optionally pretrained), or RUN/last.pt's (load_model refuses
    another arch or class count) with the checkpoint it came from ({} for a fresh one)."""
    ckpt: dict = {}
    if resume:
        model, ckpt = load_model(cfg.run_dir / "last.pt", arch=cfg.arch, num_classes=data.num_known)
        check_resumable(ckpt, cfg, data.split.known, fingerprint)
    else:
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.arch, data.num_known, **cfg.model_kwargs)
        if cfg.pretrained:
            load_pretrained(model, cfg.pretrained)
    if cfg.backmix and cfg.regen_every:
        features_and_head(model)   # a model whose CAMs cannot be taken is refused now, not after an epoch
    return model, ckpt


def training_objects(cfg: TrainConfig, model: torch.nn.Module, num_classes: int, device: torch.device, world: int,
                     *, steps_per_epoch: int) -> Training:
    """The model as it trains (synced BatchNorm, DDP) with its recipe, optimiser, schedule and precision."""
    model = sync_batchnorm(cfg, model, device, world)
    recipe = Recipe(cfg, num_classes, model)
    model = wrap_ddp(model, device, world)
    optimizer = build_optimizer(cfg, unwrap(model))
    # The compiled module wraps the model (DDP included) without copying it: one set of weights. Only
    # the training forward calls it; evaluation, the CAMs and the checkpoints use the model itself, so
    # state dicts keep their keys and the CAM path runs no graph compiled for training.
    forward = torch.compile(model) if cfg.compile else model
    return Training(model, optimizer, build_scheduler(cfg, optimizer, steps_per_epoch), Precision(device, cfg.amp),
                    recipe, forward)


def run_epoch(cfg: TrainConfig, epoch: int, training: Training, data: OpenSetData, loaders: RunLoaders,
              checkpoints: RunCheckpoints, progress: RunProgress, *, rank: int, world: int,
              run_log: RunLog) -> dict:
    """Epoch ``epoch`` (0-based): train, evaluate, and save its checkpoints; a rebuild epoch stages the
    cache's next generation before the checkpoint and publishes it after. Returns its metrics line."""
    maps = loaders.train.maps if cfg.backmix else None
    regen_due = rebuild_due(cfg, epoch)
    recorder = loop_recorder(cfg, training.model, loaders.train, epoch + 1, rank) \
        if regen_due and cfg.regen == "loop" else None
    save = functools.partial(save_mid_epoch, checkpoints=checkpoints, training=training, progress=progress,
                             epoch=epoch, maps=maps, rank=rank, world=world)
    cams = InLoopCams(cfg.run_dir, rank, world) if recorder is not None else None
    if cams is not None:   # the CAMs recorded so far go beside every mid-epoch last.pt, and come back from it
        cams.resume(recorder, progress.partial, cfg.run_dir / "last.pt")
        save = cams.saving(recorder, save)
    record = {"epoch": epoch + 1}
    record.update(train_one_epoch(training.model, loaders.train, training.optimizer, training.scheduler, cfg,
                                  training.precision, epoch, rank=rank, world=world, partial=progress.partial,
                                  save=save, recipe=training.recipe, run_log=run_log, forward=training.forward,
                                  recorder=recorder))
    progress.partial = None
    record["cache_generation"] = maps.generation if maps is not None else None
    improved = evaluate_epoch(cfg, epoch, training, data, loaders, record, progress, rank)
    if regen_due:
        from backmix.cam_cache.ranks import on_every_rank
        from backmix.cam_cache.rebuild import publish_staged
        t0 = time.perf_counter()
        in_loop = recorder.cam_seconds if recorder is not None else 0.0
        staged = recorder.stage() if recorder is not None else \
            stage_pass(cfg, training.model, data, training.precision.device, epoch=epoch + 1, rank=rank)
        # every shard is on disk, nothing published yet: a resume from here never needs the
        # in-loop CAMs again, and one that repeats this epoch still sees its masks
        record.update(regenerated=staged, regen_s=in_loop + time.perf_counter() - t0)
        with on_every_rank(cfg.cache_dir):
            save_epoch_checkpoints(checkpoints, training, progress, record, improved=improved, regen_due=True,
                                   rank=rank, world=world)
        if cams is not None:   # every rank is past the checkpoint: its shard is staged, no file is named
            cams.finish()
        publish_staged(cfg.cache_dir, staged)
        record["regen_s"] = in_loop + time.perf_counter() - t0          # the publish included
        if recorder is not None:
            record["regen_in_loop_s"] = in_loop
    else:
        save_epoch_checkpoints(checkpoints, training, progress, record, improved=improved, regen_due=False,
                               rank=rank, world=world)
    barrier(world)
    if epoch + 1 == cfg.epochs and world > 1:
        # DDP keeps the ranks' parameters equal; record each rank's digest so that is checkable.
        record["weight_digests"] = gather_weight_digests(training.model, world)
    return record


def evaluate_epoch(cfg: TrainConfig, epoch: int, training: Training, data: OpenSetData, loaders: RunLoaders,
                   record: dict, progress: RunProgress, rank: int) -> bool:
    """The epoch's validation (every epoch: it selects best.pt) and, every ``eval_every`` and after the
    last, test metrics, into ``record``, of the weights best.pt would hold (the EMA's with --ema).
    Returns whether best.pt takes this epoch (every epoch does when there are no validation rows)."""
    model = training.recipe.eval_model(training.model)
    if loaders.val is not None:
        record["val"] = validation_metrics(*predict(unwrap(model), loaders.val, training.precision), data.label_map)
    if rank == 0 and (epoch + 1 == cfg.epochs or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)):
        t0 = time.perf_counter()
        record["eval"] = evaluate(model, loaders.test, data.label_map, training.precision, show_progress(cfg, rank),
                                  loaders.open_sets)
        record["eval_s"] = time.perf_counter() - t0
    improved = rank == 0 and (loaders.val is None or record["val"]["accuracy"] > progress.best)
    if improved and loaders.val is not None:
        progress.best = record["val"]["accuracy"]
    return improved


def write_summary(cfg: TrainConfig, history: list[dict], final: dict, data: OpenSetData, loaders: RunLoaders,
                  precision: Precision, device: torch.device) -> None:
    """RUN/summary.json and its line: the last epoch and best.pt's, each with its test metrics (the test
    folder is evaluated for best.pt here, for the report only: it never selects an epoch)."""
    chosen = best_epoch(history)
    best_test = final
    if chosen is not None and chosen != history[-1]["epoch"]:
        best_model, _ = load_model(cfg.run_dir / "best.pt", arch=cfg.arch, num_classes=data.num_known)
        best_test = evaluate(best_model.to(device), loaders.test, data.label_map, precision,
                             open_sets=loaders.open_sets)
    summary = run_summary(history, best_test)
    write_json(cfg.run_dir / "summary.json", summary)
    print(summary_line(cfg.out, method_name(cfg.backmix, cfg.w_raw, cfg.views, cfg.mix_prob), cfg.arch, cfg.epochs, summary),
          flush=True)
