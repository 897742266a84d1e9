"""``backmix bench loader``: every backend with and without BackMix, one folder, one run.

Each backend runs in three modes, each a fresh loader with the same
configuration and worker count: "off" (canvas + clean crop), "on" (canvas +
mixed crop: BackMix's training stream, as in the authors' code) and "on+clean"
(canvas + clean + mixed crops, for a loss on both). Each warms up for
``--warmup`` batches and the rest of that epoch, then times whole epochs, at
least ``--batches`` batches (``time_loader``):
images/s and time per batch (median, p95); ``--repeat`` rounds, interleaved. The breakdown times the torch stages in isolation on the same
files (read and decode a batch to canvases with the loader's workers, the mix
kernel, crop/flip/normalise, host-to-device on a GPU), DALI's decode and
canvas resize alone (its own ops, threads and device) and, for every backend,
the marginal cost of its mix (BackMix batch time minus plain batch time).
The decode ceiling is the fastest installed CPU image decoder on the same files,
already in memory, on all workers: no CPU loader that decodes these files can
beat it (FFCV can: it decodes the canvas-sized copies it stored once).
"""
from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from backmix.options import GEOMETRY, DefaultsFormatter, add_option, add_options
from backmix.osr_data.errors import BackMixError
from backmix.pipeline.beton_location import DEFAULT_QUALITY, DEFAULT_STORAGE
from backmix.pipeline.loaders import BACKENDS, backend_options

from .figure_file import MODE_COLOURS, pyplot, save_figure
from .machine import machine, machine_line
from .stages import decode_ceiling, describe_input, stage_breakdown, sync

log = logging.getLogger("backmix")

# What a loader returns in each mode: (BackMix, clean crop). "on" is the authors' training stream
# (canvas + mixed crop, one model input per image, like "off"); "on+clean" adds the clean crop.
MODES = {"off": (False, True), "on": (True, False), "on+clean": (True, True)}
# How every loader benchmark times a loader (``time_loader``), said once for each command's --help.
BATCHES_HELP = "timed batches, at least: whole epochs are timed until there are this many"
WARMUP_HELP = "untimed batches first, at least: the warm-up runs to the end of its epoch"


def _percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def spread(values: list) -> Optional[float]:
    """The largest distance of a round's figure from the median over rounds, as a share of the median."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    mid = statistics.median(values)
    return max(abs(v / mid - 1) for v in values)


def time_loader(loader, warmup: int, batches: int, sync: Callable[[], None]) -> list[float]:
    """Seconds per batch of the timed window: whole epochs, at least ``batches`` batches, after a warm-up
    of at least ``warmup`` batches that always runs to the end of its epoch. Every loader has then read
    each file once and compiled what it compiles (page cache, JIT, thread and worker start), and no
    window cuts an epoch: each timed epoch's start (its workers, its prefetch) is in its first batch's
    time, as a training epoch pays it, the same for every loader."""
    times: list[float] = []
    epoch, seen, warm = 0, 0, False
    while not warm or len(times) < batches:
        timed = warm
        t = time.perf_counter()
        loader.set_epoch(epoch)
        delivered = 0
        for _ in loader:
            sync()
            now = time.perf_counter()
            if timed:
                times.append(now - t)
            seen += 1
            delivered += 1
            t = time.perf_counter()
        if not delivered:
            raise BackMixError("an epoch of the benchmark's loader gave no batch: give a folder of at least "
                               "--batch-size images")
        warm = warm or seen >= warmup
        epoch += 1
    return times


def run_benchmark(data: Optional[Path], backends: list[str], *, batches: int, warmup: int, batch_size: int,
                  canvas: int, crop: int, workers: int, device: str, n_images: int, repeat: int = 1,
                  ray_address: Optional[str] = None, prefetch: Optional[int] = None,
                  canvas_mode: str = "center", augment: str = "crop", on_error: str = "raise",
                  crop_from: str = "canvas") -> dict:
    from backmix.cam_cache.maps import UniformMaps

    from backmix.pipeline.config import LoaderConfig, choose_device
    from backmix.pipeline.loaders import make_loader

    if not backends:
        raise BackMixError(f"--backend names no backend (choose from {', '.join(BACKENDS)})")
    for b in backends:
        if b not in BACKENDS:
            raise BackMixError(f"unknown backend {b!r} (choose from {', '.join(BACKENDS)})")
    if batches < 1 or repeat < 1 or warmup < 0:
        raise BackMixError(f"--batches and --repeat must be >= 1 and --warmup >= 0, got {batches}, {repeat}, {warmup}")
    # The Ray options reach the Ray backend alone; without it in the list they are refused.
    ray_options = backend_options("ray" if "ray" in backends else backends[0], ray_address=ray_address,
                                  prefetch=prefetch)
    data, index = bench_folder(data, n_images)
    if len(index) < batch_size:
        raise BackMixError(f"{index.root} holds {len(index)} images, fewer than one batch of {batch_size}: "
                           "give a smaller --batch-size or more images")
    if "ffcv" in backends:
        ensure_beton(index, canvas, canvas_mode=canvas_mode, whole_images=crop_from == "image")
    dev = choose_device(device)
    shape = {"canvas_mode": canvas_mode, "augment": augment}   # every loader's canvas and augmentation
    # The torch stages first, and the backends in a fixed order (reference, DALI, FFCV): a process
    # that has started numba's (FFCV's) thread pool should not fork DataLoader workers after it.
    stages = stage_breakdown(index, LoaderConfig(batch_size=batch_size, canvas=canvas, crop=crop, **shape,
                                                 num_workers=workers, on_error=on_error), max(3, min(batches, 8)), dev)
    # Rounds interleave the (backend, mode) pairs, so slow drift on a shared machine hits them
    # alike; a ratio is taken within each round, then the median over rounds. FFCV's rounds come
    # last: a process that has started numba's thread pool should not fork DataLoader workers.
    pairs = [(b, mode) for b in sorted(dict.fromkeys(backends), key=BACKENDS.index) for mode in MODES]
    rounds = range(repeat)
    schedule = [pair for _ in rounds for pair in pairs if pair[0] != "ffcv"] + \
        [pair for _ in rounds for pair in pairs if pair[0] == "ffcv"]
    rates: dict = {pair: [] for pair in pairs}
    times: dict = {pair: [] for pair in pairs}
    errors: dict = {}
    skipped: dict = {}      # images a loader left out (on_error "skip"), over its rounds
    for backend, mode in schedule:
        if (backend, mode) in errors:
            continue
        backmix, clean = MODES[mode]
        config = LoaderConfig(batch_size=batch_size, canvas=canvas, crop=crop, **shape, backmix=backmix,
                              clean=clean, num_workers=workers, device=device, last_batch="drop",
                              on_error=on_error, crop_from=crop_from)
        try:
            loader = make_loader(backend, index, config, UniformMaps(len(index), config.grid),
                                 **(ray_options if backend == "ray" else {}))
            t = time_loader(loader, warmup, batches, lambda: sync(dev))
        except (BackMixError, ImportError) as e:
            errors[(backend, mode)] = str(e).splitlines()[0]
            continue
        skipped[(backend, mode)] = skipped.get((backend, mode), 0) + loader.skipped
        getattr(loader, "close", lambda: None)()   # its workers end before the next loader forks
        del loader
        rates[(backend, mode)].append(batch_size * len(t) / sum(t))
        times[(backend, mode)] += t
    results = []
    for backend, mode in pairs:
        row = {"backend": backend, "mode": mode, "backmix": MODES[mode][0], "clean": MODES[mode][1]}
        if (backend, mode) in errors:
            row.update({"images_per_s": None, "error": errors[(backend, mode)]})
        else:
            t = times[(backend, mode)]
            row.update({"images_per_s": statistics.median(rates[(backend, mode)]),
                        "images_per_s_rounds": rates[(backend, mode)],
                        "images_per_s_spread": spread(rates[(backend, mode)]),
                        "batch_ms_median": 1e3 * statistics.median(t), "batch_ms_p95": 1e3 * _percentile(t, 95),
                        "batches": len(t), "skipped": skipped.get((backend, mode), 0)})
        results.append(row)
    results.sort(key=lambda r: backends.index(r["backend"]))
    by = {(r["backend"], r["mode"]): r for r in results}
    per_backend = {"reference": stages}
    if any(r["backend"] == "dali" and r.get("images_per_s") for r in results):
        from .dali_stages import stage_times
        per_backend["dali"] = stage_times(index, LoaderConfig(batch_size=batch_size, canvas=canvas, crop=crop,
                                                              **shape, num_workers=workers, device=device),
                                          max(3, min(batches, 8)))
    for r in results:
        plain = by.get((r["backend"], "off"))
        r["breakdown"] = dict(per_backend.get(r["backend"], {}))
        if r["backmix"] and r.get("images_per_s") and plain and plain.get("images_per_s"):
            r["breakdown"]["mix_overhead_ms"] = r["batch_ms_median"] - plain["batch_ms_median"]
    ratios, ranges = {}, {}

    def per_round(a, b):
        ra, rb = rates.get(a), rates.get(b)
        return [x / y for x, y in zip(ra, rb)] if ra and rb else []

    for backend in dict.fromkeys(backends):
        candidates = {}
        for mode, name in (("on", "backmix"), ("on+clean", "backmix_clean")):
            candidates[f"{backend}_{name}_vs_plain"] = per_round((backend, mode), (backend, "off"))
            if backend != "reference":
                candidates[f"{backend}_{name}_vs_reference_{name}"] = per_round((backend, mode), ("reference", mode))
        for name, values in candidates.items():
            if values:
                ratios[name], ranges[name] = statistics.median(values), [min(values), max(values)]
    return {"machine": machine(), "data": str(data), "images": len(index),
            "config": {"batch_size": batch_size, "canvas": canvas, "crop": crop, "workers": workers, **shape,
                       "batches": batches, "warmup": warmup, "device": str(dev), "crop_from": crop_from},
            "results": results, "decode_ceiling": decode_ceiling(index, workers, on_error=on_error), "ratios": ratios,
            "ratio_range": ranges, "rounds": repeat}


def ensure_beton(index, canvas: int, storage: str = DEFAULT_STORAGE, jpeg_quality: int = DEFAULT_QUALITY,
                 canvas_mode: str = "center", whole_images: bool = False) -> Optional[Path]:
    """The FFCV loader's default beton of ``index`` at ``canvas`` (``canvas_mode`` canvases, ``storage``
    pixels; with each image's file: ``whole_images``): FFCV's loader reads a beton it never writes, so a
    benchmark writes it once, explicitly, saying so. None when FFCV is not installed (its rows say how to
    install it)."""
    from backmix.pipeline.beton import require_ffcv, write_beton
    from backmix.pipeline.beton_location import beton_locations, default_destination, write_command
    try:
        require_ffcv()
    except BackMixError:
        return None
    beton = {"storage": storage, "jpeg_quality": jpeg_quality, "canvas_mode": canvas_mode}
    found = [path for path in beton_locations(index, canvas, **beton) if path.exists()]
    if found:
        return found[0]
    out = default_destination(index, canvas, **beton)
    log.info("writing the FFCV beton once (`%s`): %s",
             write_command(index.root, canvas, canvas_mode, storage, jpeg_quality, whole_images), out)
    write_beton(index, out, canvas=canvas, whole_images=whole_images, **beton)
    return out


def format_table(report: dict) -> str:
    head = ("backend", "BackMix", "images/s", "spread", "batch ms (median)", "batch ms (p95)", "mix overhead ms")
    rows = []
    for r in report["results"]:
        if r.get("images_per_s") is None:
            rows.append((r["backend"], r["mode"], "-", "-", "-", "-", r.get("error", "")))
            continue
        mix = r["breakdown"].get("mix_overhead_ms")
        gap = r.get("images_per_s_spread")
        rows.append((r["backend"], r["mode"], f"{r['images_per_s']:.0f}", "-" if gap is None else f"±{100 * gap:.0f} %",
                     f"{r['batch_ms_median']:.1f}", f"{r['batch_ms_p95']:.1f}",
                     "" if mix is None else f"{mix:+.1f}"))
    dc = report["decode_ceiling"]
    rows.append((f"decode ceiling: {dc['decoder']}", "", f"{dc['images_per_s']:.0f}", "", "", "", ""))
    described = describe_input(report["images"], report["decode_ceiling"].get("formats") or {})
    lines = [f"input: {described}, {report['data']}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines.append("")
    for backend, what in (("reference", "torch"), ("dali", "DALI")):
        stages = next((r["breakdown"] for r in report["results"] if r["backend"] == backend and r["breakdown"]), {})
        stages = {k: v for k, v in stages.items() if k != "mix_overhead_ms"}
        if stages:
            lines.append(f"{what} stages alone, ms per batch: " + ", ".join(
                f"{k.removesuffix('_ms')} {v:.1f}" for k, v in stages.items()))
    if report["ratios"]:
        rounds = report.get("rounds", 1)
        lines.append(f"ratios (median of {rounds} rounds, min-max): " if rounds > 1 else "ratios: ")
        lines[-1] += ", ".join(f"{k} {v:.2f}" + (" ({:.2f}-{:.2f})".format(*report["ratio_range"][k]) if rounds > 1
                                                  else "") for k, v in report["ratios"].items())
    if report.get("rounds", 1) == 1:
        lines.append("one round only: these figures are noisy; take the median of --repeat 5 or more")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    plt = pyplot()

    rows = [r for r in report["results"] if r.get("images_per_s")]
    names = {"off": "plain", "on": "BackMix", "on+clean": "BackMix\n+ clean"}
    labels = [f"{r['backend']}\n{names[r['mode']]}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(rows) + 2), 3.8), dpi=100)
    ax.bar(labels, [r["images_per_s"] for r in rows], color=[MODE_COLOURS[r["mode"]] for r in rows])
    ax.tick_params(axis="x", labelsize=7)
    dc = report["decode_ceiling"]
    ax.axhline(dc["images_per_s"], color="k", ls="--", lw=1, label=f"decode ceiling of the source files ({dc['decoder']})")
    ax.set_ylabel("images/s")
    c = report["config"]
    described = describe_input(report["images"], report["decode_ceiling"].get("formats") or {})
    ax.set_title(f"{described}, canvas {c['canvas']} {c.get('canvas_mode', 'stretch')}, crop {c['crop']} "
                 f"{c.get('augment', 'crop')}, batch {c['batch_size']}, "
                 f"{c['workers']} workers\n{machine_line(report['machine'])}", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, "--plot")


def bench_folder(data: Optional[Path], n_images: int):
    """(folder, its index) a benchmark reads: ``data`` (an image folder, or a prepared root: its train/),
    else the folder of ``n_images`` bench photos, made once (``--data`` and ``--images``)."""
    from .folders import default_bench_folder, make_bench_folder
    from backmix.osr_data.index import ImageIndex, train_folder
    if data is None:
        data = default_bench_folder(n_images)
        return data, make_bench_folder(data, n_images)
    data = Path(data)
    return data, ImageIndex.load(train_folder(data))


def add_bench_folder_options(p) -> None:
    """--data and --images: the folder a loader benchmark reads (``bench loader``, ``bench peers``)."""
    p.add_argument("--data", type=Path, default=None,
                   help="image folder (class folders of images; or a prepared root: its train/); default: a "
                        "folder of 500x375 JPEGs made once from the bundled photographs under ~/.cache/backmix")
    p.add_argument("--images", type=int, default=1024, help="size of the default folder")


def register_bench(sub) -> None:
    p = sub.add_parser("loader", help="images/s of each loader with and without BackMix",
                       formatter_class=DefaultsFormatter,
                       description=__doc__.split("\n\n", 1)[1])
    add_bench_folder_options(p)
    add_option(p, "backend", ",".join(BACKENDS), several=True)
    p.add_argument("--batches", type=int, default=20, help=BATCHES_HELP)
    p.add_argument("--warmup", type=int, default=3, help=WARMUP_HELP)
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds over every loader, interleaved; images/s and ratios are medians over rounds")
    add_options(p, ("batch_size", *GEOMETRY, "crop_from", "workers", "device", "ray_address", "prefetch", "on_error"),
                defaults={"canvas": 224, "crop": 192})   # the bench folder holds ImageNet-sized photos
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    p.add_argument("--plot", type=Path, default=None, help="write a bar chart here, in the format its extension names (PNG without one)")
    p.set_defaults(func=run_bench)


def run_bench(args) -> int:
    import sys

    from .figure_file import check_report_files
    check_report_files(args.json, args.plot)      # before the work
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    report = run_benchmark(args.data, backends, batches=args.batches, warmup=args.warmup,
                           batch_size=args.batch_size, canvas=args.canvas, crop=args.crop, workers=args.workers,
                           device=args.device, n_images=args.images, repeat=args.repeat,
                           ray_address=args.ray_address, prefetch=args.prefetch,
                           canvas_mode=args.canvas_mode, augment=args.augment,
                           on_error=args.on_error, crop_from=args.crop_from)
    report["command"] = "backmix " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("backmix") else \
        "backmix bench loader " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                           if k in ("backend", "batches", "warmup", "batch_size", "canvas",
                                                    "crop", "workers", "repeat", "ray_address", "prefetch",
                                                    "canvas_mode", "augment")
                                           and v is not None)
    print(format_table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, args.plot)
    return 0
