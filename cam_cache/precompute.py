"""CAM precompute: the next cache generation from the current model.

CAM_i = sum_k w_{y_i k} F_ik (Zhou et al. 2016) for image i's own label y_i,
taken on the un-augmented canvas in inference mode, min-max scaled to [0, 1]
per image at the feature map's resolution, then bilinearly upsampled to the
canvas (align_corners=False) and adaptive-average-pooled to the g x g grid.
Upsampling and pooling are one fixed linear map of the h x w CAM, so it is
applied as a single [h*w, g*g] matrix (made once by pushing the identity
basis through ``F.interpolate`` and ``F.adaptive_avg_pool2d``): the same
numbers, without materialising canvas-sized maps. Both are convex
combinations, so the pooled map stays in [0, 1]. A flat CAM (max - min <=
1e-12) carries no information and scales to 0.5 everywhere, the value of
generation 0.

Generation n+1 = (1 - m) * generation n + m * CAM. A build may be split into
shards (``shard=(k, N)``: rows r with position % N == k); each shard is written
on its own, a finished shard is not recomputed after a restart, and the
generation is published once all N shards are there. The published file lists
rows in dataset order whatever N was, so 1 and N processes give the same file.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from backmix.osr_data.decode import DecodeError, decode_canvas
from backmix.osr_data.errors import BackMixError
from backmix.osr_data.index import ImageIndex

from .models import features_and_head
from .store import (ForegroundCache, MappedMaps, build_lock, generation_path, pending_dir, prune,
                    publish_lock, read_pointer, write_maps, write_pointer)

log = logging.getLogger("backmix")


@functools.lru_cache(maxsize=16)
def _pool_matrix(h: int, w: int, canvas: int, grid: int, device: torch.device) -> Tensor:
    """float32 [h*w, grid*grid] on ``device`` (built in float64): bilinear upsampling of an h x w map to
    canvas x canvas, then adaptive average pooling to grid x grid, as one matrix (row j = the pooled
    image of basis map j)."""
    basis = torch.eye(h * w, dtype=torch.float64).view(h * w, 1, h, w)
    up = F.interpolate(basis, size=(canvas, canvas), mode="bilinear", align_corners=False)
    return F.adaptive_avg_pool2d(up, grid).reshape(h * w, grid * grid).to(device=device, dtype=torch.float32)


def class_activation_maps(features: Tensor, fc_weight: Tensor, labels: Tensor, grid: int,
                          canvas: int) -> Tensor:
    """float32 [B, grid, grid] in [0, 1] from features [B, C, h, w] and the linear head's weights [K, C]."""
    b, _, h, w = features.shape
    cam = torch.einsum("bchw,bc->bhw", features.float(), fc_weight.float()[labels]).reshape(b, h * w)
    lo = cam.amin(dim=1, keepdim=True)
    span = cam.amax(dim=1, keepdim=True) - lo
    flat = span <= 1e-12
    cam = torch.where(flat, torch.full_like(cam, 0.5), (cam - lo) / torch.where(flat, 1.0, span))
    pool = _pool_matrix(h, w, canvas, grid, cam.device)
    return (cam @ pool).view(b, grid, grid).clamp_(0.0, 1.0)   # clamp: float rounding only


class _Canvases(Dataset):
    def __init__(self, index: ImageIndex, rows: np.ndarray, canvas: int) -> None:
        self.index, self.rows, self.canvas = index, rows, canvas

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        try:
            return decode_canvas(self.index.abspath(row), self.canvas)
        except DecodeError as e:
            return e.path


def _collate(items):
    bad = [x for x in items if isinstance(x, str)]
    if bad:
        raise DecodeError(bad[0])
    return torch.stack(items)


def compute_cams(model: nn.Module, index: ImageIndex, rows: np.ndarray, labels: np.ndarray, *, canvas: int,
                 grid: int, mean: Sequence[float], std: Sequence[float], batch_size: int = 128,
                 num_workers: int = 2, device: str | torch.device = "cpu", progress: bool = True,
                 desc: str = "CAMs") -> np.ndarray:
    """float32 [len(rows), grid, grid]: the CAM of each row for class ``labels[i]`` of ``model``."""
    body, head = features_and_head(model)
    device = torch.device(device)
    home = next(model.parameters()).device
    if home.type == device.type:
        device = home                 # "cuda" for a model on cuda:1 means cuda:1
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
    s = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
    loader = DataLoader(_Canvases(index, rows, canvas), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_collate, pin_memory=device.type == "cuda")
    out = np.empty((len(rows), grid, grid), dtype=np.float32)
    was_training = model.training
    model.eval().to(device)
    try:
        with torch.inference_mode(), tqdm(total=len(rows), desc=desc, unit="img", leave=False,
                                          disable=not progress or not sys.stderr.isatty()) as bar:
            done = 0
            for x in loader:
                x = (x.to(device, non_blocking=True).float() - m) / s
                y = torch.as_tensor(labels[done:done + len(x)], device=device)
                cams = class_activation_maps(body(x), head.weight, y, grid, canvas)
                out[done:done + len(x)] = cams.cpu().numpy()
                done += len(x)
                bar.update(len(x))
    finally:
        model.train(was_training).to(home)
    return out


def _shard_path(cache_dir: Path, generation: int, shard: tuple[int, int]) -> Path:
    return pending_dir(cache_dir, generation) / f"shard-{shard[0]}-of-{shard[1]}.arrow"


def _rows_digest(rows: np.ndarray, labels: np.ndarray) -> str:
    """Names which rows a build recomputes and as which classes: a shard of another build is stale."""
    return hashlib.sha256(np.ascontiguousarray(rows, np.int64).tobytes()
                          + np.ascontiguousarray(labels, np.int64).tobytes()).hexdigest()[:16]


def _check_pending(folder: Path, world: int, expected: dict[str, str]) -> None:
    """Refuse a pending build made with another shard count; drop shards of another build
    (other weights, base generation, data set, momentum or rows), which would mix two models' maps."""
    for path in sorted(folder.glob("shard-*-of-*.arrow")):
        n = int(path.stem.rsplit("-", 1)[1])
        if n != world:
            raise BackMixError(f"world size does not match the cache shards: a pending build in {folder} "
                               f"was made with {n} shards, this one has {world}; finish it with {n} "
                               f"processes (--shard k/{n}) or delete {folder}")
        try:
            meta = MappedMaps(path).meta
            stale = {k: meta.get(k) for k in expected} != expected
        except BackMixError:
            stale = True   # a half-written shard cannot exist (atomic rename), but a foreign file can
        if stale:
            log.info("dropping %s: made by another build", path)
            path.unlink(missing_ok=True)


def build_generation(cache_dir: str | os.PathLike, model: nn.Module, index: ImageIndex, *, canvas: int,
                     mean: Sequence[float], std: Sequence[float], momentum: float = 0.1,
                     label_map: Optional[np.ndarray] = None, rows: Optional[np.ndarray] = None,
                     batch_size: int = 128, num_workers: int = 2, device: str = "auto",
                     shard: tuple[int, int] = (0, 1), checkpoint_digest: str = "", publish: bool = True,
                     progress: bool = True) -> Optional[int]:
    """Compute this shard of generation n+1; publish it when every shard is there (see module doc).

    ``label_map`` maps dataset labels to the model's classes (-1: not a class of the model);
    ``rows`` (default: all) are the dataset rows to recompute, the others keep their maps.
    Shard k of N computes ``rows[k::N]``. Returns the new generation number when it was
    published (by this call or, meanwhile, by another shard's), else None.
    """
    cache_dir = Path(cache_dir)
    k, world = shard
    if not 0 <= k < world:
        raise BackMixError(f"shard {k}/{world}: need 0 <= k < N")
    if not 0.0 <= momentum <= 1.0:
        raise BackMixError(f"momentum must lie in [0, 1], got {momentum}")
    _, head = features_and_head(model)            # refuse a model without a CAM head before any work
    with build_lock(cache_dir, shard):
        return _build_shard(cache_dir, model, index, head, canvas=canvas, mean=mean, std=std,
                            momentum=momentum, label_map=label_map, rows=rows, batch_size=batch_size,
                            num_workers=num_workers, device=device, shard=shard,
                            checkpoint_digest=checkpoint_digest, publish=publish, progress=progress)


def _build_shard(cache_dir: Path, model: nn.Module, index: ImageIndex, head: nn.Linear, *, canvas, mean, std,
                 momentum, label_map, rows, batch_size, num_workers, device, shard, checkpoint_digest,
                 publish, progress) -> Optional[int]:
    k, world = shard
    current = ForegroundCache(cache_dir, index=index)
    nxt = current.generation + 1
    rows = np.arange(len(index)) if rows is None else np.asarray(rows, dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= len(index)):
        raise BackMixError(f"build_generation: rows must lie in 0..{len(index) - 1}")
    labels = index.labels[rows] if label_map is None else np.asarray(label_map)[index.labels[rows]]
    if (labels < 0).any():
        raise BackMixError("build_generation: some rows have a label the model does not know; "
                           "pass only rows of its classes")
    if labels.size and labels.max() >= head.out_features:
        raise BackMixError(f"build_generation: the model has {head.out_features} classes but rows are "
                           f"labelled up to {labels.max()}; pass a label_map to its classes")
    meta = {"generation": str(nxt), "base": str(current.generation), "momentum": str(float(momentum)),
            "checkpoint": checkpoint_digest, "dataset": index.fingerprint(),
            "rows": _rows_digest(rows, labels)}
    folder = pending_dir(cache_dir, nxt)
    folder.mkdir(exist_ok=True)
    _check_pending(folder, world, meta)
    path = _shard_path(cache_dir, nxt, shard)
    if path.exists():
        log.info("shard %d/%d of generation %d is already built", k, world, nxt)
    else:
        mine = rows[k::world]
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        cams = compute_cams(model, index, mine, labels[k::world], canvas=canvas, grid=current.grid,
                            mean=mean, std=std, batch_size=batch_size, num_workers=num_workers,
                            device=device, progress=progress,
                            desc=f"CAMs gen {nxt}" + (f" shard {k}/{world}" if world > 1 else ""))
        # float32 arithmetic, one rounding to float16 per generation
        new = (1.0 - momentum) * current.gather(mine) + momentum * cams
        write_maps(path, mine, index.labels[mine], new.astype(np.float16), meta)
    if not publish:
        return None
    shards = sorted(folder.glob(f"shard-*-of-{world}.arrow"))
    if len(shards) < world:
        log.info("generation %d: %d of %d shards built; it is published when all are", nxt, len(shards), world)
        return None
    return publish_generation(cache_dir, nxt)


def publish_generation(cache_dir: str | os.PathLike, generation: Optional[int] = None) -> int:
    """Merge the complete shards of generation n+1 into its file and make it current.

    With ``generation`` given, a generation another process published meanwhile
    counts as done (the shards of a build race to publish; one wins).
    """
    cache_dir = Path(cache_dir)
    with publish_lock(cache_dir):
        ptr = read_pointer(cache_dir)
        if generation is not None and int(ptr["generation"]) >= generation:
            return generation
        current = ForegroundCache(cache_dir)
        nxt = current.generation + 1
        folder = pending_dir(cache_dir, nxt)
        shards = sorted(folder.glob("shard-*-of-*.arrow"))
        if not shards:
            raise BackMixError(f"no build of generation {nxt} is pending in {cache_dir}")
        world = int(shards[0].stem.rsplit("-", 1)[1])
        if any(int(p.stem.rsplit("-", 1)[1]) != world for p in shards):
            raise BackMixError(f"the pending build in {folder} mixes shard counts; delete {folder} and rebuild")
        missing = sorted(set(range(world)) - {int(p.stem.split("-")[1]) for p in shards})
        if missing:
            raise BackMixError(f"generation {nxt} is not complete: shard(s) {missing} of {world} are missing")
        parts = [MappedMaps(p) for p in shards]
        keys = ("base", "dataset", "checkpoint", "momentum", "rows")
        for part in parts:
            if (part.meta.get("base") != str(current.generation)
                    or part.meta.get("dataset") != current.meta.get("dataset")):
                raise BackMixError(f"shard {part.path} was built on another generation or data set than "
                                   f"{generation_path(cache_dir, current.generation)}; delete {folder} and rebuild")
            if [part.meta.get(k) for k in keys] != [parts[0].meta.get(k) for k in keys]:
                raise BackMixError(f"shards {parts[0].path.name} and {part.path.name} come from different "
                                   f"builds; delete {folder} and rebuild")
            if part.grid != current.grid or (len(part) and (part.rows.min() < 0 or part.rows.max() >= len(current))):
                raise BackMixError(f"shard {part.path} does not fit the cache (grid or rows)")
        maps = np.array(current.maps)            # float16 copy of the current generation
        for part in parts:
            maps[part.rows] = part.maps
        meta = {k: parts[0].meta.get(k, "") for k in ("momentum", "checkpoint", "base")}
        write_maps(generation_path(cache_dir, nxt), np.arange(len(maps)), current.labels, maps,
                   {**meta, "generation": nxt, "dataset": current.meta.get("dataset", "")})
        del parts, current                       # unmap before deleting the shards
        keep = int(ptr.get("keep", 3))
        write_pointer(cache_dir, nxt, keep)
        shutil.rmtree(folder, ignore_errors=True)
        prune(cache_dir, nxt, keep)
        log.info("published generation %d of %s", nxt, cache_dir)
        return nxt
