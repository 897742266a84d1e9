"""``backmix bench scale``: what an ImageNet-sized folder costs before and around training.

On a folder of ``--classes`` x ``--per-class`` JPEGs (default 1000 x 1281, ImageNet's shape; hard
links to the bench photographs, built once under ~/.cache/backmix), it times, with the stages'
public functions only:
- indexing the folder: the first ``ImageIndex.load``, which scans it and writes index.csv and its
  binary copy index.arrow, then a second one that reads the copy (both files' sizes are reported);
- starting the foreground cache and opening it (``start_cache``: generation 0 has no file,
  ``ForegroundCache`` and a first gather);
- training the small CNN on the folder, before any loader runs (so no loader's workers are still
  leaving): with ``--batches N``, ``backmix train`` started as a user starts it (a child process)
  and stopped after N steps, reporting the seconds from launch to its first batch in hand and to
  the end of its first step; with ``--batches 0``, the trainer in this process for ``--epochs``
  whole epochs (the cache rebuilt after each but the last), reporting its seconds to the first
  batch (its wall time less its epochs, evaluations and rebuilds) and the cache rebuild's time as
  a fraction of an epoch;
- each backend: the seconds to its first batch (``make_loader`` and one batch), then ``--epochs``
  epochs of at most ``--batches`` batches (0: whole epochs).
For the training run and each backend it samples the resident set (RSS) and private memory (USS,
psutil) of the main process and of each worker process every ``--sample-s`` seconds, keeping each
one's peak. A line is logged as each phase starts and the JSON (``--json``) is rewritten as each
one ends; Ctrl-C removes the temporary cache and run folders and stops the training child. FFCV
needs its beton: a backend without one reports the command that writes it, or ``--write-beton``
writes (and times) it first.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import psutil

from backmix.osr_data.errors import BackMixError

from .machine import machine, machine_line

log = logging.getLogger("backmix")


class MemoryPeaks:
    """Peak RSS and USS (bytes) of this process and of each of its descendants, sampled on a thread."""

    def __init__(self, every_s: float) -> None:
        self.every_s, self.main, self.workers = every_s, {"rss": 0, "uss": 0}, {}
        self._stop = threading.Event()

    def _sample(self) -> None:
        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            try:
                info = proc.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            peak = self.main if proc.pid == me.pid else self.workers.setdefault(proc.pid, {"rss": 0, "uss": 0})
            peak["rss"], peak["uss"] = max(peak["rss"], info.rss), max(peak["uss"], info.uss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every_s)

    @contextmanager
    def sampling(self) -> Iterator["MemoryPeaks"]:
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()
            self._sample()

    @staticmethod
    def workers_uss_now() -> dict[int, float]:
        """pid -> private memory (USS, MiB) of each descendant now: what an epoch left behind in a worker."""
        out = {}
        for proc in psutil.Process().children(recursive=True):
            try:
                out[proc.pid] = proc.memory_full_info().uss / 2 ** 20
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return out

    def report(self) -> dict:
        mib = 2 ** 20
        return {"main_rss_mib": self.main["rss"] / mib, "main_uss_mib": self.main["uss"] / mib,
                "workers": [{"rss_mib": w["rss"] / mib, "uss_mib": w["uss"] / mib} for w in self.workers.values()]}


def _timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def run_scale(classes: int, per_class: int, *, backends: list[str], epochs: int = 2, batches: Optional[int] = None,
              batch_size: int = 64, workers: int = 2, canvas: int = 40, crop: int = 32, sample_s: float = 0.5,
              write_beton: bool = False, train: bool = True, source_images: int = 1024,
              on_phase: Optional[Callable[[dict], None]] = None) -> dict:
    """The report (see the module doc); ``on_phase(report)`` is called as each phase ends."""
    from backmix.cam_cache import ForegroundCache, start_cache
    from .folders import default_scale_folder, make_scale_folder
    from backmix.osr_data.index import INDEX_NAME, ImageIndex
    from backmix.osr_data.index_sidecar import SIDECAR_NAME
    from backmix.pipeline.config import LoaderConfig
    from backmix.pipeline.loaders import BACKENDS, make_loader

    from backmix.trainers.config import TrainConfig
    from .scale_train import bounded_train, train_args
    from backmix.trainers.train import main as train_main

    done = on_phase or (lambda report: None)
    for b in backends:
        if b not in BACKENDS:
            raise BackMixError(f"unknown backend {b!r} (choose from {', '.join(BACKENDS)})")
    if epochs < 1 or (batches is not None and batches < 1) or batch_size < 1 or sample_s <= 0:
        raise BackMixError(f"--epochs, --batches and --batch-size must be >= 1 and --sample-s > 0, "
                           f"got {epochs}, {batches}, {batch_size}, {sample_s}")
    if batch_size > classes * per_class:
        raise BackMixError(f"{classes} x {per_class} images are fewer than one batch of {batch_size}")
    log.info("bench scale: the %d x %d folder", classes, per_class)
    root, build_s = _timed(make_scale_folder, default_scale_folder(classes, per_class, source_images), classes, per_class,
                           source_images=source_images)
    report: dict = {"machine": machine(), "data": str(root), "images": classes * per_class, "classes": classes,
                    "per_class": per_class, "config": {"epochs": epochs, "batches_per_epoch": batches,
                                                       "batch_size": batch_size, "workers": workers,
                                                       "canvas": canvas, "crop": crop, "sample_s": sample_s},
                    "folder_build_s": build_s}
    done(report)
    log.info("bench scale: indexing %s", root / "train")
    for split in ("train", "test"):          # the index files are what the next lines time
        (root / split / INDEX_NAME).unlink(missing_ok=True)
    index, report["index_s"] = _timed(ImageIndex.load, root / "train")
    _, report["index_load_s"] = _timed(ImageIndex.load, root / "train")
    report["index_mib"] = {name: (root / "train" / name).stat().st_size / 2 ** 20 for name in (INDEX_NAME, SIDECAR_NAME)
                           if (root / "train" / name).exists()}
    ImageIndex.load(root / "test")
    done(report)
    # Removed on the way out, a Ctrl-C (KeyboardInterrupt) included.
    with tempfile.TemporaryDirectory(prefix="backmix-scale-") as scratch:
        log.info("bench scale: the foreground cache")
        cache_dir = Path(scratch) / "cache"
        _, report["cache_init_s"] = _timed(start_cache, cache_dir, index)
        t = time.perf_counter()
        maps = ForegroundCache(cache_dir, index=index)
        maps.gather(list(range(min(batch_size, len(index)))))
        report["cache_open_s"] = time.perf_counter() - t
        done(report)
        if write_beton and "ffcv" in backends:
            log.info("bench scale: writing the FFCV beton")
            from backmix.pipeline.beton import beton_locations, write_beton as write
            _, report["beton_write_s"] = _timed(write, index, beton_locations(index, canvas)[0], canvas=canvas,
                                                num_workers=workers)
            done(report)
        # Training first: its start-up is timed on a machine no loader's workers (Ray's above all) are
        # still leaving.
        if train and batches:
            memory = MemoryPeaks(sample_s)
            # The phase line once the child runs: a Ctrl-C from then on stops it too.
            report["train"] = bounded_train(train_args(root, Path(scratch) / "run", Path(scratch) / "train-cache",
                                                       batch_size=batch_size, canvas=canvas, crop=crop,
                                                       workers=workers), batches, memory,
                                            started=f"bench scale: backmix train, stopped after {batches} steps")
            report["train"]["memory"] = memory.report()
            done(report)
        elif train:
            log.info("bench scale: training %d whole epoch(s) in this process", epochs)
            report["train"] = _train_run(train_main, TrainConfig(
                data=str(root), out=str(Path(scratch) / "run"), epochs=epochs, batch_size=batch_size,
                canvas=canvas, crop=crop, workers=workers, regen_every=1, eval_every=epochs, progress=False,
                cache=str(Path(scratch) / "train-cache")), sample_s)
            done(report)
        report["backends"] = {}
        for backend in backends:
            log.info("bench scale: loader %s, %d epoch(s) of %s batches", backend, epochs, batches or "all")
            report["backends"][backend] = _backend_run(make_loader, backend, index, maps, LoaderConfig(
                batch_size=batch_size, canvas=canvas, crop=crop, num_workers=workers), epochs, batches, sample_s)
            done(report)
    return report


def _backend_run(make_loader, backend, index, maps, config, epochs: int, batches: Optional[int],
                 sample_s: float) -> dict:
    memory = MemoryPeaks(sample_s)
    try:
        with memory.sampling():
            t = time.perf_counter()
            loader = make_loader(backend, index, config, maps)
            row = {"build_s": time.perf_counter() - t}
            n, epoch_s, after = 0, [], []
            for epoch in range(epochs):
                loader.set_epoch(epoch)
                t0 = time.perf_counter()
                for step, batch in enumerate(loader):
                    if epoch == 0 and step == 0:
                        row["first_batch_s"] = time.perf_counter() - t
                    n += len(batch.indices)
                    if batches is not None and step + 1 >= batches:
                        break
                epoch_s.append(time.perf_counter() - t0)
                after.append(MemoryPeaks.workers_uss_now())
        if hasattr(loader, "close"):   # its persistent workers end now, not in the next phase's samples
            loader.close()
        del loader
    except (BackMixError, ImportError) as e:
        return {"error": str(e).splitlines()[0]}
    row.update({"epoch_s": epoch_s, "images": n, "images_per_s": n / sum(epoch_s), "memory": memory.report()})
    # Growth of each worker's private memory from the end of epoch 1 to the end of the last epoch (the
    # same persistent workers): a leak shows here, the one-off cost of a worker's first batches does not.
    same = set(after[0]) & set(after[-1]) if len(after) > 1 else set()
    row["worker_growth_mib"] = max((after[-1][pid] - after[0][pid] for pid in same), default=None)
    return row


def _train_run(train_main, cfg, sample_s: float) -> dict:
    memory = MemoryPeaks(sample_s)
    with memory.sampling():
        t = time.perf_counter()
        train_main(cfg)
        wall = time.perf_counter() - t
    records = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines() if line]
    epoch_s = [r["train_s"] for r in records]
    rebuild_s = [r["regen_s"] for r in records if "regen_s" in r]
    # An in-loop rebuild's CAM seconds lie inside its epoch's train_s already: count them once.
    after_epochs = [r["regen_s"] - r.get("regen_in_loop_s", 0.0) for r in records if "regen_s" in r]
    other = sum(epoch_s) + sum(after_epochs) + sum(r.get("eval_s", 0.0) for r in records)
    return {"first_batch_s": wall - other, "wall_s": wall, "epoch_s": epoch_s, "rebuild_s": rebuild_s,
            "rebuild_fraction_of_epoch": (sum(rebuild_s) / len(rebuild_s)) / (sum(epoch_s) / len(epoch_s))
            if rebuild_s else None, "memory": memory.report()}


def format_table(report: dict) -> str:
    lines = [f"{report['images']} images ({report['classes']} classes x {report['per_class']}), {machine_line(report['machine'])}",
             "", "| step | seconds |", "|---|---|"]
    for key, name in (("folder_build_s", "build the folder (hard links; once)"),
                      ("index_s", "index (scan + write index.csv and index.arrow)"),
                      ("index_load_s", "index (read: index.arrow, checked against index.csv)"),
                      ("cache_init_s", "start the cache (generation 0: no file)"), ("cache_open_s", "open the cache + first gather"),
                      ("beton_write_s", "write the FFCV beton")):
        if key in report:
            lines.append(f"| {name} | {report[key]:.2f} |")
    if report.get("index_mib"):
        lines += ["", "index on disk: " + ", ".join(f"{name} {mib:.1f} MiB" for name, mib in report["index_mib"].items())]
    lines += ["", "| loader | first batch s | epoch s | images/s | main RSS / USS MiB | workers | "
                  "worker RSS / USS MiB (max) |", "|---|---|---|---|---|---|---|"]
    rows = dict(report.get("backends", {}))
    if "train" in report:
        rows["train (cnn32)"] = report["train"]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | {r['error']} | | | | | |")
            continue
        m = r["memory"]
        w = m["workers"]
        worst = (f"{max(x['rss_mib'] for x in w):.0f} / {max(x['uss_mib'] for x in w):.0f}") if w else "-"
        images_s = f"{r['images_per_s']:.0f}" if "images_per_s" in r else ""
        epochs = " ".join(f"{s:.1f}" for s in r["epoch_s"]) if "epoch_s" in r else f"({r['steps']} steps)"
        lines.append(f"| {name} | {r['first_batch_s']:.2f} | {epochs} | "
                     f"{images_s} | {m['main_rss_mib']:.0f} / {m['main_uss_mib']:.0f} | {len(w)} | {worst} |")
    growth = {name: r["worker_growth_mib"] for name, r in report["backends"].items()
              if r.get("worker_growth_mib") is not None}
    if growth:
        lines += ["", "worker private memory (USS) growth from the end of epoch 1 to the end of the last, MiB "
                  "(largest worker): " + ", ".join(f"{name} {g:+.1f}" for name, g in growth.items())]
    if report.get("train", {}).get("first_step_s") is not None:
        lines += ["", f"train: first batch in hand {report['train']['first_batch_s']:.2f} s after the start, "
                      f"its first step done at {report['train']['first_step_s']:.2f} s (the model's first "
                      "forward and backward on top)"]
    fraction = report.get("train", {}).get("rebuild_fraction_of_epoch")
    if fraction is not None:
        lines += ["", f"cache rebuild: {fraction:.2f} of a training epoch "
                      f"({report['train']['rebuild_s'][0]:.1f} s vs {report['train']['epoch_s'][0]:.1f} s)"]
    return "\n".join(lines)


def register_bench(sub) -> None:
    from .geometry_options import add_geometry_options
    from backmix.pipeline.loaders import BACKENDS

    p = sub.add_parser("scale", help="index, cache, first-batch, memory and rebuild costs on an ImageNet-sized folder",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=__doc__)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--per-class", type=int, default=1281, help="training images a class")
    p.add_argument("--backend", default=",".join(BACKENDS), help="comma list of backends")
    p.add_argument("--epochs", type=int, default=2, help="epochs of each loader (and of training with --batches 0)")
    p.add_argument("--batches", type=int, default=50,
                   help="batches an epoch of each loader, and steps of the training run (a `backmix train` child "
                        "stopped after them); 0: whole epochs, and the trainer in this process with its rebuild")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    add_geometry_options(p)
    p.add_argument("--source-images", type=int, default=1024,
                   help="distinct JPEGs (the bench folder of that size) the folder's files link to")
    p.add_argument("--sample-s", type=float, default=0.5, help="seconds between memory samples")
    p.add_argument("--write-beton", action="store_true", help="write (and time) the FFCV beton first if needed")
    p.add_argument("--no-train", action="store_true", help="leave out the training run")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    p.set_defaults(func=run_bench_scale)


def run_bench_scale(args) -> int:
    from backmix._fs import atomic_write_bytes, check_output_file
    if args.json is not None:
        check_output_file(args.json, "--json")
        args.json.parent.mkdir(parents=True, exist_ok=True)
    if args.batches < 0:
        raise BackMixError(f"--batches must be >= 0 (0: whole epochs), got {args.batches}")

    def write_json(report: dict) -> None:
        if args.json:      # after every phase: an interrupted run keeps what it measured
            atomic_write_bytes(args.json, (json.dumps({**report, "command": command}, indent=2) + "\n").encode())

    command = "backmix bench scale " + " ".join(sys.argv[3:]) if sys.argv[1:3] == ["bench", "scale"] \
        else "backmix bench scale"
    report = run_scale(args.classes, args.per_class, backends=[b.strip() for b in args.backend.split(",") if b.strip()],
                       epochs=args.epochs, batches=args.batches or None, batch_size=args.batch_size, workers=args.workers,
                       canvas=args.canvas, crop=args.crop, sample_s=args.sample_s, write_beton=args.write_beton,
                       train=not args.no_train, source_images=args.source_images, on_phase=write_json)
    report["command"] = command
    print(format_table(report))
    write_json(report)
    return 0
