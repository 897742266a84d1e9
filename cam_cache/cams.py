"""Class activation maps pooled to the g x g grid, of canvases in memory or read from the data set.

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

The model's input is ``Normalize`` of the uint8 canvas, the loaders' own
normalisation, so a canvas the CAM pass reads and one a loader serves reach
the model as the same numbers.
"""
from __future__ import annotations

import functools
import logging
import sys
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from backmix.device import choose_device, parse_device
from backmix.models import features_and_head
from backmix.osr_data.canvas_reads import CanvasDataset, collate_canvases, undecodable
from backmix.osr_data.index import ImageIndex
from backmix.osr_data.normalize import Normalize

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


def body_features(body: nn.Module, x: Tensor) -> Tensor:
    """``body``'s features of the normalised float32 batch ``x``, cast first to the body's own dtype (a
    float64 or half model takes CAMs too)."""
    weight = next(body.parameters(), None)
    return body(x if weight is None or weight.dtype == x.dtype else x.to(weight.dtype))


def compute_cams(model: nn.Module, index: ImageIndex, rows: np.ndarray, labels: np.ndarray, *, canvas: int,
                 grid: int, canvas_mode: str = "center", mean: Sequence[float], std: Sequence[float], batch_size: int = 128,
                 num_workers: int = 2, device: str | torch.device = "cpu", progress: bool = True,
                 desc: str = "CAMs", on_error: str = "raise") -> np.ndarray:
    """float32 [len(rows), grid, grid]: the CAM of each row for class ``labels[i]`` of ``model``. Each
    file is read as the loaders read it (``read_canvas``, ``undecodable``): one missing or changed since
    indexing raises ``BackMixError``; one that does not decode raises ``DecodeError`` under on_error
    "raise", and under "skip" is logged and its map is NaN (no CAM: the caller keeps the row's old map).
    ``device``: "auto", "cpu", "cuda", "cuda:N" or a ``torch.device`` (``choose_device``)."""
    body, head = features_and_head(model)
    asked = parse_device(device)
    home = next(model.parameters()).device
    # "cuda" (or "auto") for a model on cuda:1 means cuda:1; a device named with its index is that one.
    device = choose_device(home if home.type == asked.type and asked.index is None else asked)
    normalise = Normalize(tuple(mean), tuple(std))
    loader = DataLoader(CanvasDataset(index, canvas, canvas_mode), sampler=np.asarray(rows).tolist(),
                        batch_size=batch_size, num_workers=num_workers, collate_fn=collate_canvases,
                        pin_memory=device.type == "cuda")
    rows = np.asarray(rows)
    out = np.full((len(rows), grid, grid), np.nan, dtype=np.float32)
    was_training = model.training
    model.eval().to(device)
    try:
        with torch.inference_mode(), tqdm(total=len(rows), desc=desc, unit="img", leave=False,
                                          disable=not progress or not sys.stderr.isatty()) as bar:
            done = 0
            for x, got, failed in loader:
                for e in undecodable(failed, on_error):
                    log.warning("skipped %s: it does not decode (its map keeps its previous value)", e.path)
                n = len(got) + len(failed)
                # the batch's positions in ``rows`` whose files decoded (the others stay NaN)
                at = done + np.flatnonzero(np.isin(rows[done:done + n], got.numpy()))
                if len(at):
                    x = normalise(x.to(device, non_blocking=True))
                    y = torch.as_tensor(labels[at], device=device)
                    cams = class_activation_maps(body_features(body, x), head.weight, y, grid, canvas)
                    out[at] = cams.cpu().numpy()
                done += n
                bar.update(n)
    finally:
        model.train(was_training).to(home)
    return out


