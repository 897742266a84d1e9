"""``backmix show`` and ``backmix cache show``: one batch as a PNG sheet.

Columns are images of the batch; rows are the raw canvas, its foreground map
as a heat map over it (with its colour bar, 0 = background, 1 = foreground), the
top-k mask (the cells a partner blanks), and the mixed image the model sees
(cropped, flipped, de-normalised) with the pasted box's place outlined on the
canvas row and the dataset index of the partner whose background it holds.
With ``--split`` the batch holds only the known classes of that open-set split,
the images the trainer sees, labelled 0..K-1 as it labels them.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from backmix.osr_data.decode import CANVAS_MODES
from backmix.osr_data.errors import BackMixError
from backmix.osr_data.splits import resolve_split
from backmix.pipeline.backmix import top_k_mask
from backmix.pipeline.batch import BackMixBatch
from backmix.pipeline.config import ON_ERROR
from backmix.pipeline.loaders import LOCAL_RAY_HELP
from backmix.pipeline.sampling import AUGMENTS

from .figure_file import check_figure_file, pyplot, save_figure
from .geometry_options import add_geometry_options

CELL_IN, DPI = 1.5, 100
COLORBAR_IN = 0.6      # the strip on the right that holds the foreground map's colour bar
ROWS = ("canvas", "foreground map", "top-k mask", "mixed (model input)")


def sheet_size(n: int) -> tuple[int, int]:
    """(width, height) in pixels of a sheet of ``n`` images."""
    return round((n * CELL_IN + COLORBAR_IN) * DPI), round((len(ROWS) * CELL_IN + 0.4) * DPI)


def column_titles(batch: BackMixBatch, partners: Optional[np.ndarray], n: int) -> list[tuple[str, str]]:
    """(canvas row title, mixed row title) per column: the image's dataset index and label, and the
    dataset index of the partner whose background box the mixed image holds."""
    rows = batch.indices.cpu().numpy()
    labels = batch.labels.cpu().numpy()
    mixed = partners is not None and batch.mixed is not None
    return [(f"#{rows[j]} y={labels[j]}", f"box from #{rows[partners[j]]}" if mixed else "") for j in range(n)]


def render_sheet(batch: BackMixBatch, maps: np.ndarray, masks: np.ndarray, path: str | Path, *,
                 boxes: Optional[np.ndarray] = None, box_hw: tuple[int, int] = (0, 0),
                 partners: Optional[np.ndarray] = None,
                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), title: str = "") -> Path:
    """Write the sheet of ``batch`` (its first len(maps) images) to ``path`` (PNG)."""
    plt = pyplot()
    import matplotlib
    from matplotlib.patches import Rectangle

    n = len(maps)
    canvas = batch.canvas[:n].permute(0, 2, 3, 1).cpu().numpy()
    shown = batch.mixed if batch.mixed is not None else batch.images
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    model_in = ((shown[:n].cpu().float() * s + m).clamp(0, 1).permute(0, 2, 3, 1).numpy())
    size = canvas.shape[1]
    w, h = sheet_size(n)
    fig, axes = plt.subplots(len(ROWS), n, figsize=(w / DPI, h / DPI), dpi=DPI, squeeze=False)
    titles = column_titles(batch, partners, n)
    heat = None
    for j in range(n):
        axes[0, j].imshow(canvas[j])
        if boxes is not None and batch.mixed is not None:
            dy, dx = boxes[j, 2], boxes[j, 3]
            axes[0, j].add_patch(Rectangle((dx - 0.5, dy - 0.5), box_hw[1], box_hw[0], fill=False,
                                           edgecolor="yellow", linewidth=1))
        axes[1, j].imshow(canvas[j])
        heat = axes[1, j].imshow(maps[j], cmap="jet", alpha=0.5, vmin=0, vmax=1,
                                 extent=(-0.5, size - 0.5, size - 0.5, -0.5))
        axes[2, j].imshow(canvas[j])
        axes[2, j].imshow(np.where(masks[j], 1.0, np.nan), cmap="autumn", alpha=0.6, vmin=0, vmax=1,
                          extent=(-0.5, size - 0.5, size - 0.5, -0.5))
        axes[3, j].imshow(model_in[j])
        axes[0, j].set_title(titles[j][0], fontsize=7)
        axes[3, j].set_title(titles[j][1], fontsize=7)
    for i, name in enumerate(ROWS):
        axes[i, 0].set_ylabel(name, fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=8)
    right = 1 - COLORBAR_IN / (w / DPI)
    fig.subplots_adjust(left=0.03, right=right - 0.005, top=0.93, bottom=0.01, wspace=0.05, hspace=0.2)
    row = axes[1, -1].get_position()
    # the bar in full colour (the maps are drawn half transparent over their canvas)
    scale = matplotlib.cm.ScalarMappable(norm=heat.norm, cmap=heat.cmap)
    bar = fig.colorbar(scale, cax=fig.add_axes([right + 0.01, row.y0, 0.012 * 8 / max(n, 1), row.height]))
    bar.set_label("foreground", fontsize=6)
    bar.ax.tick_params(labelsize=6)
    return save_figure(fig, path, dpi=DPI)


def sheet_for(data: Path, out: Path, *, backend: str = "reference", cache: Optional[Path] = None, n: int = 8,
              seed: int = 0, canvas: int = 40, crop: int = 32, grid: int = 8, workers: int = 0,
              ray_address: Optional[str] = None, prefetch: Optional[int] = None,
              canvas_mode: str = "center", augment: str = "crop", on_error: str = "raise",
              split: Optional[str] = None) -> Path:
    """Load one batch of ``n`` images from ``data`` with ``backend`` and draw it (with on_error "skip",
    images that do not decode are left out of it, each named in a warning; with ``split``, only the
    known classes of that open-set split, labelled as the trainer labels them)."""
    from backmix.cam_cache import ForegroundCache, UniformMaps
    from backmix.osr_data.index import ImageIndex

    from backmix.pipeline.config import LoaderConfig
    from backmix.pipeline.loaders import backend_options, make_loader

    options = backend_options(backend, ray_address=ray_address, prefetch=prefetch)
    if n < 2:
        raise BackMixError("--n must be at least 2: BackMix pairs images of one batch")
    index = ImageIndex.load(_split_folder(data))
    rows, label_map, known = None, None, ""
    if split is not None:
        open_set = resolve_split(index.classes, split)
        label_map = open_set.label_map(index.classes)
        rows = np.flatnonzero(label_map[index.labels] >= 0)
        known = f", known classes {', '.join(open_set.known)} (y = 0..{len(open_set.known) - 1})"
    maps = ForegroundCache(cache, index=index, grid=grid) if cache else UniformMaps(len(index), grid)
    config = LoaderConfig(batch_size=n, canvas=canvas, crop=crop, grid=grid, seed=seed, num_workers=workers,
                          canvas_mode=canvas_mode, augment=augment, on_error=on_error)
    loader = make_loader(backend, index, config, maps, indices=rows, label_map=label_map, **options)
    batch = next(iter(loader), None)
    if batch is None:
        raise BackMixError(f"no image of {index.root} decodes")
    params = config.sampler().draw(len(batch.indices), 0, 0, config.rank)
    soft = maps.gather(batch.indices.cpu().numpy())
    masks = top_k_mask(torch.from_numpy(soft), config.top_k_ratio, torch.from_numpy(params.tie_break)).numpy()
    title = (f"{backend} loader, {data}{known}, cache generation {maps.generation}; "
             "yellow: where the partner's background box lands")
    return render_sheet(batch, soft, masks, out, boxes=params.boxes, box_hw=config.sampler().box_hw,
                        partners=params.partners, mean=config.mean, std=config.std, title=title)


def _split_folder(data: Path) -> Path:
    """A prepared root (with train/) or an image folder itself."""
    data = Path(data)
    return data / "train" if (data / "train").is_dir() else data


def _add_args(p, cache_required: bool) -> None:
    from backmix.pipeline.loaders import BACKENDS
    p.add_argument("--data", type=Path, required=True, help="prepared root (with train/) or an image folder")
    p.add_argument("--out", type=Path, required=True, help="file to write: a PNG, or the format its extension names (.pdf, .svg, .jpg ...)")
    p.add_argument("--cache", type=Path, required=cache_required, default=None,
                   help="foreground cache folder" + ("" if cache_required else " (default: generation 0, 0.5 everywhere)"))
    p.add_argument("--backend", choices=BACKENDS, default="reference")
    p.add_argument("--n", type=int, default=8, help="images in the sheet")
    p.add_argument("--split", default=None, metavar="N|A,B,C",
                   help="only the known classes of this open-set split (a number 0..4 or a comma list of known "
                        "class names), the images the trainer sees (default: every class of the folder)")
    p.add_argument("--seed", type=int, default=0)
    add_geometry_options(p, grid=True)
    p.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT",
                   help=f"--backend ray: the cluster to join; None: {LOCAL_RAY_HELP}")
    p.add_argument("--prefetch", type=int, default=None,
                   help="--backend ray: batches in flight at most; None: 4")
    p.add_argument("--canvas-mode", choices=CANVAS_MODES, default="center",
                   help="center = shorter side resized, centre square; stretch = both sides resized")
    p.add_argument("--augment", choices=AUGMENTS, default="crop",
                   help="the model input: crop = random crop + flip; rrc = RandomResizedCrop + flip")
    p.add_argument("--on-error", choices=ON_ERROR, default="raise",
                   help="an image that does not decode: fail, or leave it out of the sheet (named)")
    p.set_defaults(func=run_show)


def register(top) -> None:
    p = top.add_parser("show", help="draw one mixed batch as a PNG sheet",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Rows: raw canvas, foreground map, top-k mask, mixed model input.")
    _add_args(p, cache_required=False)


def register_cache_show(cache_sub) -> None:
    p = cache_sub.add_parser("show", help="draw a cache's maps, masks and a mixed batch as a PNG sheet",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_args(p, cache_required=True)


def run_show(args) -> int:
    check_figure_file(args.out)          # before loading anything
    path = sheet_for(args.data, args.out, backend=args.backend, cache=args.cache, n=args.n, seed=args.seed,
                     canvas=args.canvas, crop=args.crop, grid=args.grid, ray_address=args.ray_address,
                     prefetch=args.prefetch, canvas_mode=args.canvas_mode, augment=args.augment,
                     on_error=args.on_error, split=args.split)
    print(f"wrote {path}")
    return 0
