"""Train a closed-set classifier with BackMix and evaluate it as an open-set recogniser.

Plain functions over ``TrainConfig``, in the style of torchvision's reference
``train.py``: ``train_one_epoch``, ``evaluate``, ``regenerate`` and ``main``.

Order of one epoch e (0-based): train, evaluate, save RUN/last.pt, append the
epoch's line to RUN/metrics.jsonl. When e+1 is a multiple of ``regen_every``
(and not the last epoch) the epoch also rebuilds the foreground cache:
``--regen loop`` (default) takes each batch's CAMs as it trains, ``--regen pass``
decodes the data again after the epoch; either way every rank stages its shard
(``backmix.cam_cache.rebuild``), then the checkpoint is saved (recording the generation the rebuild
publishes), then rank 0 publishes. A run killed before the checkpoint repeats the
epoch on ``--resume`` (same weights, same masks, so the same in-loop CAMs); one
killed after it publishes the shards on disk. The stream of masks stays what it
would have been (see ``backmix.cam_cache.precompute``).
With ``--save-every N``, last.pt is also written every N steps inside an epoch
("partial": each rank's loader position, running sums and RNG), and ``--resume``
continues from that step: on the CPU the result equals the uninterrupted run's bit
for bit. A ``--regen loop`` rebuild epoch is the exception: its in-loop CAMs live in
memory until its shard is written, so it saves no partial checkpoint and a resume
repeats it (the same numbers again).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from backmix.models import build_model, features_and_head, load_model, read_checkpoint, save_checkpoint
from backmix.osr_data.errors import BackMixError
from backmix.osr_data.index import atomic_write_bytes
from backmix.osr_data.open_set import OpenSetData, load_data
from backmix.osr_data.protocols import split_list
from backmix.osr_data.splits import OpenSetSplit
from backmix.pipeline.augment import IMAGENET_MEAN, IMAGENET_STD
from backmix.pipeline.config import LoaderConfig
from backmix.pipeline.loaders import make_loader

from .config import TrainConfig, option
from .config_file import write_config_yaml
from .metrics import open_set_metrics
from .recipe import Recipe, load_pretrained, sync_batchnorm
from .run_log import RunLog
from .open_test import open_test_indexes
from .selection import best_epoch, run_summary, summary_line, validation_metrics
from .run_lock import hold_run_folder

log = logging.getLogger("backmix")

# Fields a resumed run may change; every other one must match RUN/config.json. ``data`` may move:
# the data set itself must be the run's (its fingerprint is compared).
RESUME_MAY_CHANGE = ("device", "workers", "progress", "backend", "ray_address", "prefetch", "eval_every", "save_every", "on_error", "out",
                     "data", "cache", "log_every", "log", "open_test")


# The data (``OpenSetData``, ``load_data``) lives in ``backmix.osr_data.open_set``.


def loader_config(cfg: TrainConfig, device: torch.device, *, train: bool, rank: int = 0,
                  world: int = 1) -> LoaderConfig:
    return LoaderConfig(
        batch_size=cfg.batch_size if train else max(cfg.batch_size, 256),
        canvas=cfg.canvas, crop=cfg.crop, grid=cfg.grid, backmix=cfg.backmix and train,
        canvas_mode=cfg.canvas_mode, augment=cfg.augment, auto_augment=cfg.auto_augment if train else "none",
        clean=not (cfg.backmix and train and cfg.w_raw == 0),   # no clean crops if no loss reads them
        box_fraction=cfg.box_fraction, top_k_ratio=cfg.top_k_ratio, seed=cfg.seed,
        shuffle=train, train=train, rank=rank if train else 0, world_size=world if train else 1,
        last_batch="keep", num_workers=cfg.workers,   # under DDP too: every image once, equal steps per rank
        on_error=cfg.on_error, device=device.type)


# --------------------------------------------------------------------------- devices, DDP

def init_distributed(request: str) -> tuple[torch.device, int, int]:
    """(device, rank, world size); joins the process group when torchrun started us."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if request == "cuda" and not torch.cuda.is_available():
        raise BackMixError("--device cuda was asked for, but CUDA is not available on this machine")
    cuda = request == "cuda" or (request == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local)
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return device, rank, world


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def gather_weight_digests(model: nn.Module, world: int) -> list[str]:
    """sha256 of every rank's parameters (not buffers: BatchNorm running stats are per rank)."""
    h = hashlib.sha256()
    for p in unwrap(model).parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    digests = [None] * world
    dist.all_gather_object(digests, h.hexdigest())
    return digests


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

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, clip: float = 0.0) -> None:
        """Backward and step; ``clip`` > 0: first clip the gradients' global L2 norm to it (unscaled)."""
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        if clip:
            if self.scaler is not None:
                self.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip)
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()


def show_progress(cfg: TrainConfig, rank: int) -> bool:
    return cfg.progress and rank == 0 and sys.stderr.isatty()


# --------------------------------------------------------------------------- optimisation

def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    # No weight decay on BatchNorm and biases (the usual recipe for small CNNs and ResNets).
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.opt == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.sgd_momentum,
                               nesterov=cfg.nesterov and cfg.sgd_momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_epochs``, then cosine to zero; stepped once per batch."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = min(total - 1, int(round(cfg.warmup_epochs * steps_per_epoch)))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Dropout's randomness is a pure function of (seed, epoch, rank), so a resumed run repeats it."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


# --------------------------------------------------------------------------- the three steps

def train_one_epoch(model: nn.Module, loader, optimizer, scheduler, cfg: TrainConfig, precision: Precision,
                    epoch: int, *, rank: int = 0, world: int = 1, partial: Optional[dict] = None,
                    save=None, recipe: Optional[Recipe] = None,
                    run_log: Optional[RunLog] = None) -> dict:
    """One pass over the loader; loss = w_raw * CE(clean) + w_mix * CE(mixed) (``BackMixBatch.loss``);
    train accuracy is on the first part the batch has.

    partial: this rank's part of a mid-epoch checkpoint (loader position, running sums, seconds, RNG):
    the epoch continues where it was cut. save(partial) is called every ``cfg.save_every`` steps
    (not at an epoch's last step: the epoch's own checkpoint follows). A rebuild epoch's in-loop
    CAMs are taken by the recorder attached to the loader (``backmix.cam_cache.recorder``).
    ``recipe``: label smoothing, Mixup/CutMix and the EMA (default: plain cross-entropy);
    ``run_log``: the step lines and progress (default: a progress bar on a terminal)."""
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
    progress = run_log.epoch(epoch, len(loader), partial["loader"]["step"] if partial else 0, world)
    ready = time.perf_counter()
    for batch in loader:
        waited = time.perf_counter() - ready   # the share of the step spent waiting for data
        # One forward over the clean and the mixed crops (BatchNorm sees both together).
        x, targets = recipe.inputs(batch, epoch, scheduler.last_epoch)
        n = batch.labels.shape[0]
        if cfg.channels_last and device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with precision.autocast():
            logits = model(x)
            loss = batch.loss(recipe.criterion, logits, clean=cfg.w_raw, mixed=cfg.w_mix, targets=targets)
        optimizer.zero_grad(set_to_none=True)
        precision.step(loss, optimizer, cfg.clip_grad)
        scheduler.step()
        recipe.after_step(model, scheduler.last_epoch)
        with torch.no_grad():
            sums += torch.stack([loss.detach().double() * n,
                                 (logits[:n].argmax(1) == batch.labels).sum().double(),
                                 torch.tensor(float(n), dtype=torch.float64, device=device)])
        progress.step(scheduler.last_epoch, loss, n, waited, optimizer.param_groups[0]["lr"])
        position = loader.state_dict()
        if save is not None and cfg.save_every and scheduler.last_epoch % cfg.save_every == 0 \
                and position["step"] < len(loader):
            save({"loader": position, "sums": sums.tolist(), "torch_rng": torch.get_rng_state(),
                  "train_s": before + time.perf_counter() - start})
        ready = time.perf_counter()
    progress.close()
    seconds = before + time.perf_counter() - start
    if world > 1:
        dist.all_reduce(sums)
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


def open_test_loaders(cfg: TrainConfig, device: torch.device, folders: list[str]) -> dict:
    return {name: make_loader(cfg.backend, index, loader_config(cfg, device, train=False), **cfg.loader_options())
            for name, index in open_test_indexes(folders).items()}


def regenerate(cfg: TrainConfig, model: nn.Module, data: OpenSetData, device: torch.device, *, epoch: int,
               rank: int = 0, publish: bool = True) -> int:
    """The cache generation rebuilt after ``epoch`` (1-based) by a separate pass over the current weights
    (rows whose shards are on disk are taken over), staged on every rank, then published unless
    ``publish`` is False; see ``backmix.cam_cache.rebuild``."""
    from backmix.cam_cache.rebuild import publish_staged, stage_generation
    staged = stage_generation(cfg.cache_dir, unwrap(model), data.train, canvas=cfg.canvas,
                              canvas_mode=cfg.canvas_mode, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                              momentum=cfg.momentum, label_map=data.label_map, rows=data.known_rows,
                              batch_size=max(cfg.batch_size, 128), num_workers=cfg.workers, device=device,
                              checkpoint_digest=rebuild_tag(cfg, epoch), progress=show_progress(cfg, rank))
    return publish_staged(cfg.cache_dir, staged) if publish else staged


def loop_recorder(cfg: TrainConfig, model: nn.Module, loader, epoch: int, rank: int):
    """The in-loop rebuild of rebuild epoch ``epoch`` (1-based), started: it takes the CAMs of every batch
    ``loader`` yields (the library's ``backmix.rebuilding``, split into stage and publish here)."""
    from backmix.cam_cache.recorder import InLoopRebuild
    return InLoopRebuild(loader, model, momentum=cfg.momentum, checkpoint_digest=rebuild_tag(cfg, epoch),
                         batch_size=max(cfg.batch_size, 128), progress=show_progress(cfg, rank)).start()


def rebuild_tag(cfg: TrainConfig, epoch: int) -> str:
    """Names the weights of a rebuild in its shards: a resume reuses only shards of the very same one."""
    return f"epoch-{epoch} {cfg.regen}"


# --------------------------------------------------------------------------- run files

@contextlib.contextmanager
def writing(path: Path):
    """A write into the run folder: an OSError (read-only, disk full, gone) is one line naming the file."""
    try:
        yield
    except OSError as e:
        raise BackMixError(f"cannot write {path}: {e.strerror or e}") from None


def save_run_checkpoint(path: Path, model: nn.Module, cfg: TrainConfig, num_classes: int, **state) -> None:
    with writing(path):
        save_checkpoint(path, model, arch=cfg.arch, num_classes=num_classes, model_kwargs=cfg.model_kwargs,
                        **state)


def check_run_folder(run: Path) -> None:
    """--out: a folder (made here) that takes files, checked before any work."""
    if run.exists() and not run.is_dir():
        raise BackMixError(f"--out {run} is a file; a run needs a folder")
    try:
        run.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run):
            pass
    except OSError as e:
        raise BackMixError(f"--out {run} cannot be written: {e.strerror or e}") from None


def write_jsonl(path: Path, records: list[dict]) -> None:
    with writing(path):
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in records).encode())


def read_jsonl(path: Path) -> list[dict]:
    """The complete lines of a JSON-lines file (a line cut short by a kill is ignored)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def append_jsonl(path: Path, record: dict) -> None:
    with writing(path), open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def rng_state() -> dict:
    """Every RNG's state as tensors and plain values (a checkpoint is loaded with ``weights_only``)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos,
                                                      has_gauss, gauss], "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])


def resume_config(cfg: TrainConfig, explicit: set[str]) -> TrainConfig:
    """RUN/config.json, with the few fields a resumed run may change taken from ``cfg``."""
    path = cfg.run_dir / "config.json"
    if path.is_file() and not (cfg.run_dir / "last.pt").is_file():
        raise BackMixError(f"the run in {cfg.run_dir} stopped before its first checkpoint, so there is nothing "
                           "to resume: rerun it without --resume")
    if not (cfg.run_dir / "last.pt").is_file() or not path.is_file():
        raise BackMixError(f"nothing to resume in {cfg.run_dir}: it has no last.pt and config.json")
    saved = TrainConfig.load(path).to_dict()
    new = cfg.to_dict()
    changed = sorted(k for k in explicit if k in saved and new[k] != saved[k] and k not in RESUME_MAY_CHANGE)
    if changed:
        k = changed[0]
        raise BackMixError(f"--resume cannot change {option(k)} of the run in {cfg.run_dir}: it was "
                           f"{saved[k]!r}, not {new[k]!r}")
    for k in explicit:
        if k in RESUME_MAY_CHANGE:
            saved[k] = new[k]
    saved["out"] = cfg.out
    return TrainConfig.from_dict(saved)


# --------------------------------------------------------------------------- main

def main(cfg: TrainConfig, *, resume: bool = False, explicit: Optional[set[str]] = None) -> dict:
    """Train (or resume) one run; returns the final evaluation metrics (rank 0; {} on other ranks)."""
    if resume:
        cfg = resume_config(cfg, explicit or set())
    device, rank, world = init_distributed(cfg.device)
    deterministic = torch.are_deterministic_algorithms_enabled()
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    else:
        torch.backends.cudnn.benchmark = True
    try:
        made_here = not cfg.run_dir.exists()
        if rank == 0:
            check_run_folder(cfg.run_dir)
        # the folder is held (a second run into it is refused) before anything is written there
        with hold_run_folder(cfg.run_dir, made_here) if rank == 0 else contextlib.nullcontext():
            with RunLog(cfg, enabled=rank == 0) as run_log:
                return _run(cfg, device, rank, world, resume, run_log)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _run(cfg: TrainConfig, device: torch.device, rank: int, world: int, resume: bool, run_log: RunLog) -> dict:
    run = cfg.run_dir
    # The validation rows follow the training seed: the methods of one (split, seed) pair share them.
    data = load_data(cfg.data, cfg.split, cfg.val_fraction, cfg.seed, split_list(cfg.protocol, cfg.splits_file))
    if cfg.backend == "ffcv":   # both betons found, or both named in one line, before any work
        from backmix.pipeline.beton_location import require_betons
        require_betons(cfg.data, [data.train, data.test], cfg.canvas, cfg.canvas_mode, cfg.beton_mode,
                       int(cfg.jpeg_quality))
    K = data.num_known
    fingerprint = hashlib.sha256((data.train.fingerprint() + data.test.fingerprint()).encode()).hexdigest()
    if rank == 0:
        if not resume and (run / "last.pt").exists():
            raise BackMixError(f"{run} already holds a run; pass --resume to continue it or choose another --out")
        check_run_folder(run)
    barrier(world)

    # The model: fresh, or the last checkpoint (load_model refuses another arch or class count).
    ckpt: dict = {}
    if resume:
        model, ckpt = load_model(run / "last.pt", arch=cfg.arch, num_classes=K)
        if tuple(ckpt.get("known_classes", ())) != data.split.known:
            raise BackMixError(f"{run / 'last.pt'} was trained on known classes "
                               f"{', '.join(ckpt.get('known_classes', ()))}, not {', '.join(data.split.known)}")
        if ckpt.get("data_fingerprint", fingerprint) != fingerprint:
            raise BackMixError(f"--resume cannot change --data of the run in {run}: it was trained on "
                               f"{ckpt['config']['data']}, and {cfg.data} holds another data set")
        if ckpt["epoch"] >= cfg.epochs:
            raise BackMixError(f"the run in {run} has finished all {cfg.epochs} epochs; nothing to resume")
    else:
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.arch, K, **cfg.model_kwargs)
        if cfg.pretrained:
            load_pretrained(model, cfg.pretrained)
    if cfg.backmix and cfg.regen_every:
        features_and_head(model)   # a model whose CAMs cannot be taken is refused now, not after an epoch
    if rank == 0:   # only now: a resume refused above leaves the run's config as it was
        with writing(run / "config.json"):
            atomic_write_bytes(run / "config.json", (json.dumps(cfg.to_dict(), indent=2) + "\n").encode())
        with writing(run / "config.yaml"):
            write_config_yaml(run / "config.yaml", cfg)
        with writing(run / "train.log"):
            run_log.open(run, *((ckpt["scheduler"]["last_epoch"], ckpt["epoch"]) if resume else ()))
    model.to(device)
    if cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)

    # The foreground cache: generation 0 (0.5 everywhere, no file) unless it exists. Baselines need none.
    maps = None
    if cfg.backmix:
        from backmix.cam_cache import ForegroundCache, start_cache
        if rank == 0:
            start_cache(cfg.cache_dir, data.train, grid=cfg.grid, canvas_mode=cfg.canvas_mode)
        barrier(world)
        maps = ForegroundCache(cfg.cache_dir, index=data.train, grid=cfg.grid, canvas_mode=cfg.canvas_mode)

    train_loader = make_loader(cfg.backend, data.train, loader_config(cfg, device, train=True, rank=rank, world=world),
                               maps=maps, indices=data.known_rows, label_map=data.label_map,
                               **cfg.loader_options())
    eval_loader = make_loader(cfg.backend, data.test, loader_config(cfg, device, train=False),
                              **cfg.loader_options()) if rank == 0 else None
    open_sets = open_test_loaders(cfg, device, cfg.open_test) if rank == 0 else {}
    val_loader = make_loader(cfg.backend, data.train, loader_config(cfg, device, train=False), indices=data.val_rows,
                             label_map=data.label_map, **cfg.loader_options()) \
        if rank == 0 and len(data.val_rows) else None
    if len(train_loader) == 0:
        raise BackMixError(f"{len(data.known_rows)} known training images are too few for batch size "
                           f"{cfg.batch_size} on {world} rank(s)")

    model = sync_batchnorm(cfg, model, device, world)
    recipe = Recipe(cfg, K, model)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(cfg, unwrap(model))
    scheduler = build_scheduler(cfg, optimizer, len(train_loader))
    precision = Precision(device, cfg.amp)

    history: list[dict] = []
    best = -1.0
    start = 0
    partial = None   # this rank's part of a mid-epoch checkpoint
    if resume:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if precision.scaler is not None and ckpt.get("scaler"):
            precision.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        if recipe.ema is not None:
            recipe.ema.module.load_state_dict(ckpt["ema_state_dict"])
        history, best, start = list(ckpt.get("metrics", [])), ckpt.get("best", -1.0), ckpt["epoch"]
        if ckpt.get("partial"):
            if len(ckpt["partial"]) != world:
                raise BackMixError(f"{run / 'last.pt'} was saved mid-epoch by {len(ckpt['partial'])} rank(s); "
                                   f"resume it on as many, not {world}")
            partial = ckpt["partial"][rank]
        if cfg.backmix and ckpt.get("regen_pending"):
            maps.refresh()
            # Every rank decides from the shared cache, so all of them take the same branch.
            if maps.generation < ckpt["cache_generation"]:
                t0 = time.perf_counter()
                # --regen loop: the shards are all on disk (the checkpoint was saved after them); pass: any
                # missing rows are computed from these weights, the ones the pass used
                gen = regenerate(cfg, model, data, device, epoch=start, rank=rank)
                history[-1].update(regen_s=time.perf_counter() - t0, regenerated=gen)
                log.info("redid the cache rebuild after epoch %d that the interrupted run left undone", start)
            else:   # rebuilt before the kill: keep its logged time if the line made it to disk
                logged = {r.get("epoch"): r for r in read_jsonl(run / "metrics.jsonl")}
                if "regenerated" in logged.get(start, {}):
                    history[-1] = logged[start]
        if rank == 0:
            write_jsonl(run / "metrics.jsonl", history)
            log.info("resuming %s at epoch %d/%d%s", run, start + 1, cfg.epochs,
                     f", step {partial['loader']['step'] + 1}" if partial else "")
    elif rank == 0:
        write_jsonl(run / "metrics.jsonl", [])

    extra_common = {"config": cfg.to_dict(), "known_classes": list(data.split.known),
                    "data_fingerprint": fingerprint}
    ema_state = (lambda: {"ema_state_dict": recipe.ema.module.state_dict()}) if recipe.ema is not None else dict
    final: dict = history[-1].get("eval", {}) if history else {}
    t_run = time.perf_counter()
    for epoch in range(start, cfg.epochs):
        def save_mid_epoch(mine: dict, epoch: int = epoch) -> None:
            """last.pt part-way through ``epoch``: every rank's loader position, sums and RNG with the rest."""
            parts = [None] * world
            if world > 1:
                dist.all_gather_object(parts, mine)
            else:
                parts = [mine]
            if rank == 0:
                save_run_checkpoint(run / "last.pt", model, cfg, K, **extra_common, epoch=epoch,
                                    optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                                    rng=rng_state(), metrics=history, best=best, regen_pending=False,
                                    scaler=precision.scaler.state_dict() if precision.scaler else None,
                                    cache_generation=train_loader.maps.generation if cfg.backmix else 0,
                                    partial=parts, **ema_state())

        record = {"epoch": epoch + 1}
        last = epoch + 1 == cfg.epochs
        regen_due = cfg.backmix and cfg.regen_every > 0 and (epoch + 1) % cfg.regen_every == 0 and not last
        recorder = loop_recorder(cfg, model, train_loader, epoch + 1, rank) if regen_due and cfg.regen == "loop" \
            else None
        record.update(train_one_epoch(model, train_loader, optimizer, scheduler, cfg, precision, epoch,
                                      rank=rank, world=world, partial=partial,
                                      save=save_mid_epoch if recorder is None else None, recipe=recipe,
                                      run_log=run_log))
        partial = None
        record["cache_generation"] = train_loader.maps.generation if cfg.backmix else None
        if val_loader is not None:   # every epoch: it is what selects best.pt
            record["val"] = validation_metrics(*predict(unwrap(recipe.eval_model(model)), val_loader, precision),
                                           data.label_map)   # the weights best.pt would hold
        if rank == 0 and (last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)):
            t0 = time.perf_counter()
            record["eval"] = final = evaluate(recipe.eval_model(model), eval_loader, data.label_map, precision,
                                              show_progress(cfg, rank), open_sets)
            record["eval_s"] = time.perf_counter() - t0
        # best.pt: on the validation rows only (every epoch is "best" when there are none)
        improved = rank == 0 and (val_loader is None or record["val"]["accuracy"] > best)
        best = record["val"]["accuracy"] if improved and val_loader is not None else best

        def save_checkpoints() -> None:
            if rank == 0:
                state = dict(extra_common, epoch=epoch + 1, optimizer=optimizer.state_dict(),
                             scheduler=scheduler.state_dict(), rng=rng_state(), metrics=history + [record],
                             best=best, regen_pending=regen_due,
                             scaler=precision.scaler.state_dict() if precision.scaler else None,
                             cache_generation=(record["cache_generation"] or 0) + int(regen_due), **ema_state())
                # best.pt first: a last.pt on disk means every best.pt up to its epoch is there too
                if improved:   # the weights evaluated: the EMA's with --ema
                    save_run_checkpoint(run / "best.pt", recipe.eval_model(model), cfg, K, **state)
                save_run_checkpoint(run / "last.pt", model, cfg, K, **state)

        if regen_due:
            from backmix.cam_cache.rebuild import on_every_rank, publish_staged
            t0 = time.perf_counter()
            in_loop = recorder.cam_seconds if recorder is not None else 0.0
            staged = recorder.stage() if recorder is not None else \
                regenerate(cfg, model, data, device, epoch=epoch + 1, rank=rank, publish=False)
            # every shard is on disk, nothing published yet: a resume from here never needs the
            # in-loop CAMs again, and one that repeats this epoch still sees its masks
            record.update(regenerated=staged, regen_s=in_loop + time.perf_counter() - t0)
            with on_every_rank(cfg.cache_dir):
                save_checkpoints()
            publish_staged(cfg.cache_dir, staged)
            record["regen_s"] = in_loop + time.perf_counter() - t0          # the publish included
            if recorder is not None:
                record["regen_in_loop_s"] = in_loop
        else:
            save_checkpoints()
        barrier(world)
        if last and world > 1:
            # DDP keeps the ranks' parameters equal; record each rank's digest so that is checkable.
            record["weight_digests"] = gather_weight_digests(model, world)
        history.append(record)
        if rank == 0:
            append_jsonl(run / "metrics.jsonl", record)
            log.info("%s", epoch_line(record, cfg.epochs))
            run_log.epoch_done(record)
    if rank == 0:
        log.info("trained %d epochs in %.1fs", cfg.epochs - start, time.perf_counter() - t_run)
        chosen = best_epoch(history)
        best_test = final
        if chosen is not None and chosen != history[-1]["epoch"]:   # the test folder, for the report only
            best_model, _ = load_model(run / "best.pt", arch=cfg.arch, num_classes=K)
            best_test = evaluate(best_model.to(device), eval_loader, data.label_map, precision, open_sets=open_sets)
        summary = run_summary(history, best_test)
        with writing(run / "summary.json"):
            atomic_write_bytes(run / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
        print(summary_line(cfg.out, "BackMix" if cfg.backmix else "baseline", cfg.arch, cfg.epochs, summary),
              flush=True)
    return final if rank == 0 else {}


def epoch_line(r: dict, epochs: int) -> str:
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
        parts.append(f"test acc {e['accuracy']:.3f} AUROC {e['auroc_msp']:.3f} OSCR {e['oscr_msp']:.3f}")
    return "  ".join(parts)


# --------------------------------------------------------------------------- eval of a checkpoint

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
    model, _ = load_model(checkpoint, num_classes=data.num_known)
    given = {"backend": backend, "device": device, "workers": workers, "progress": progress, "on_error": on_error,
             "auto_augment": "none",   # evaluation never augments: any backend takes the checkpoint
             **({"canvas_mode": canvas_mode} if canvas_mode else {})}
    cfg = TrainConfig.from_dict({**saved, **given}) if saved else TrainConfig(**given)
    dev, _, _ = init_distributed(device)
    model.to(dev)
    loader = make_loader(cfg.backend, data.test, loader_config(cfg, dev, train=False), **cfg.loader_options())
    return evaluate(model, loader, data.label_map, Precision(dev, cfg.amp),
                    progress and sys.stderr.isatty(), open_test_loaders(cfg, dev, list(open_test)))
