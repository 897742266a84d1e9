"""``backmix experiment``: baseline vs BackMix on every split of every data set, one table.

The methods of a split share seed, model, schedule and epochs; only the loss
differs: "baseline" CE on the clean crops, "backmix" CE on the clean and the
mixed crops (the trainer's default), "backmix-mixed" CE on the mixed crops alone
(the authors' recipe, ``--w-raw 0``: half the forward passes). Each finished run is one line of DIR/results.jsonl, so an interrupted
experiment continues where it stopped (its unfinished run restarts from scratch).
"""
from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from backmix.osr_data.decode import CANVAS_MODES
from backmix.osr_data.errors import BackMixError
from backmix.osr_data.index import atomic_write_bytes
from backmix.osr_data.prepare import DATASETS, prepare
from backmix.pipeline.sampling import AUGMENTS

from .config import TrainConfig
from .train import append_jsonl, read_jsonl
from .train import main as train_main

log = logging.getLogger("backmix")

METHODS = {"baseline": {"backmix": False}, "backmix": {"backmix": True},
           "backmix-mixed": {"backmix": True, "w_raw": 0.0}}
# What fits 20 runs in < 30 minutes on 2 CPU cores (about a minute a run).
EXPERIMENT_DEFAULTS = dict(epochs=10, arch="cnn32", width=0.5, batch_size=64, regen_every=2,
                           eval_every=0, workers=0)


def results_table(results: list[dict]) -> str:
    """Markdown: one row per (dataset, method), mean ± std over splits."""
    rows = ["| dataset | method | splits | accuracy | AUROC (MSP) | OSCR (MSP) |",
            "|---|---|---:|---:|---:|---:|"]
    keys = sorted({(r["dataset"], r["method"]) for r in results},
                  key=lambda k: (k[0], list(METHODS).index(k[1]) if k[1] in METHODS else 9))
    for ds, method in keys:
        rs = [r for r in results if r["dataset"] == ds and r["method"] == method]

        def cell(name: str) -> str:
            v = np.array([r["metrics"][name] for r in rs], dtype=np.float64) * 100
            return f"{v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.1f}"

        rows.append(f"| {ds} | {method} | {len(rs)} | {cell('accuracy')} | {cell('auroc_msp')} | "
                    f"{cell('oscr_msp')} |")
    return "\n".join(rows) + "\n"


def run_experiment(out: Path, datasets: list[str], splits: int, overrides: dict, *,
                   keep_runs: bool = False, methods: tuple[str, ...] = ("baseline", "backmix")) -> list[dict]:
    for method in methods:
        if method not in METHODS:
            raise BackMixError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    for ds in datasets:
        if ds not in DATASETS:
            raise BackMixError(f"unknown data set {ds!r} (choose from {', '.join(DATASETS)})")
    if not 1 <= splits <= 5:
        raise BackMixError(f"--splits must lie in 1..5, got {splits}")
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    results = read_jsonl(results_path)   # a line cut by a kill is dropped: that run is redone
    done = {(r["dataset"], r["split"], r["method"]) for r in results}
    t_all = time.perf_counter()
    for ds in datasets:
        root = out / "data" / ds
        if prepare(ds, root):
            log.info("prepared %s in %s", ds, root)
        for split in range(splits):
            for method in methods:
                if (ds, split, method) in done:
                    continue
                run_dir = out / "runs" / ds / f"split{split}" / method
                if run_dir.exists():   # left by an interrupted experiment: start it again
                    shutil.rmtree(run_dir)
                cfg = TrainConfig(**{**EXPERIMENT_DEFAULTS, **overrides, "data": str(root), "out": str(run_dir),
                                     "split": str(split), **METHODS[method], "progress": False})
                t0 = time.perf_counter()
                metrics = train_main(cfg)
                record = {"dataset": ds, "split": split, "method": method, "seconds": time.perf_counter() - t0,
                          "config": cfg.to_dict(), "metrics": metrics}
                append_jsonl(results_path, record)
                results.append(record)
                if not keep_runs:   # checkpoints of 20 runs are not worth keeping by default
                    for name in ("last.pt", "best.pt"):
                        (run_dir / name).unlink(missing_ok=True)
                    shutil.rmtree(run_dir / "cache", ignore_errors=True)
    table = results_table(results)
    atomic_write_bytes(out / "results.md", table.encode())
    log.info("experiment done in %.0fs", time.perf_counter() - t_all)
    print(table, end="")
    return results


def register(top) -> None:
    p = top.add_parser("experiment", help="baseline vs BackMix over data sets and splits, as one table",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="For each data set and each open-set split, train the plain baseline and "
                                   "BackMix with the same seed and budget; write DIR/results.jsonl (one line a "
                                   "run; finished runs are skipped when run again) and DIR/results.md "
                                   "(mean ± std over splits). Data sets are prepared under DIR/data if absent.")
    p.add_argument("--out", type=Path, required=True, help="experiment folder")
    p.add_argument("--datasets", default="digits,digits-on-photos", help="comma list of bundled data sets")
    p.add_argument("--splits", type=int, default=5, help="splits 0..N-1 of each data set")
    p.add_argument("--epochs", type=int, default=EXPERIMENT_DEFAULTS["epochs"], help="epochs a run")
    p.add_argument("--width", type=float, default=EXPERIMENT_DEFAULTS["width"], help="cnn32 channel multiplier")
    p.add_argument("--arch", default=EXPERIMENT_DEFAULTS["arch"], help="model")
    p.add_argument("--backend", default="reference", help="loader")
    p.add_argument("--canvas-mode", choices=CANVAS_MODES, default="center",
                   help="canvas of each image: center = shorter side resized, centre square; stretch")
    p.add_argument("--augment", choices=AUGMENTS, default="crop",
                   help="after the mix: crop = random crop + flip; rrc = RandomResizedCrop + flip")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="training device")
    p.add_argument("--workers", type=int, default=EXPERIMENT_DEFAULTS["workers"],
                   help="decoding workers (0: decode in the training process; quickest for tiny images)")
    p.add_argument("--methods", default="baseline,backmix",
                   help=f"comma list of {', '.join(METHODS)}; results of other methods already in DIR stay "
                        "in the table")
    p.add_argument("--seed", type=int, default=0, help="the same for every method of a split")
    p.add_argument("--keep-runs", action="store_true", help="keep each run's checkpoints and cache")
    p.set_defaults(func=run_cli)


def run_cli(args) -> int:
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    overrides = {"epochs": args.epochs, "width": args.width, "arch": args.arch, "backend": args.backend,
                 "device": args.device, "workers": args.workers, "seed": args.seed,
                 "canvas_mode": args.canvas_mode, "augment": args.augment}
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    run_experiment(args.out, datasets, args.splits, overrides, keep_runs=args.keep_runs, methods=methods)
    return 0
