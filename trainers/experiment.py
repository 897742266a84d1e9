"""``backmix experiment``: baseline vs BackMix, paired per (split, seed), on every data set.

The methods of a (split, seed) share seed, model, schedule and epochs; only the
loss differs: "baseline" CE on the clean crops, "backmix" CE on the clean and the
mixed crops (the trainer's default), "backmix-mixed" CE on the mixed crops alone
(the authors' recipe, ``--w-raw 0``: half the forward passes). A (split, seed)
is therefore one paired comparison, and the report leads with the paired
differences (each BackMix variant minus the baseline) because the spread over
splits is larger than the gaps between methods. Each finished run is one line
of DIR/results.jsonl, so an interrupted experiment continues where it stopped
(its unfinished run restarts from scratch).
"""
from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

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
# Budgets: "quick" is the 10-epoch budget of the first experiment (smoke runs); "converged" is where the
# baseline's test accuracy and AUROC have stopped rising (docs/experiment/learning-curves.md).
BUDGETS = {"quick": dict(epochs=10, width=0.5, lr=0.05),
           "converged": dict(epochs=30, width=0.5, lr=0.05)}
EXPERIMENT_DEFAULTS = dict(arch="cnn32", batch_size=64, regen_every=2, eval_every=0, workers=0)
# A folder's finished runs are reused only under the same budget: these fields must match.
BUDGET_FIELDS = ("epochs", "width", "lr", "arch", "batch_size")
# (results.jsonl key, column title) of the reported metrics, MSP and MLS side by side.
COLUMNS = (("accuracy", "accuracy"), ("auroc_msp", "AUROC (MSP)"), ("auroc_mls", "AUROC (MLS)"),
           ("oscr_msp", "OSCR (MSP)"), ("oscr_mls", "OSCR (MLS)"))


def run_seed(record: dict) -> int:
    return record.get("seed", record["config"]["seed"])   # lines written before --seeds carry it in config


def method_order(method: str) -> int:
    return list(METHODS).index(method) if method in METHODS else len(METHODS)


def mean_std(values: np.ndarray) -> tuple[float, float]:
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def paired_differences(results: list[dict]) -> list[dict]:
    """One row per (dataset, BackMix variant, split, seed) that also has a baseline run: variant - baseline."""
    runs = {(r["dataset"], r["split"], run_seed(r), r["method"]): r["metrics"] for r in results}
    rows = []
    for (ds, split, seed, method), metrics in runs.items():
        base = runs.get((ds, split, seed, "baseline"))
        if method == "baseline" or base is None:
            continue
        rows.append({"dataset": ds, "method": method, "split": split, "seed": seed,
                     **{key: metrics[key] - base[key] for key, _ in COLUMNS}})
    return sorted(rows, key=lambda r: (r["dataset"], method_order(r["method"]), r["split"], r["seed"]))


def paired_table(results: list[dict]) -> str:
    """Markdown: per (dataset, variant), mean ± std of variant - baseline over the pairs, and pairs ahead."""
    diffs = paired_differences(results)
    head = " | ".join(f"Δ {title}" for _, title in COLUMNS)
    rows = [f"| dataset | variant − baseline | pairs | {head} |", "|---|---|---:|" + "---:|" * len(COLUMNS)]
    for ds, method in sorted({(d["dataset"], d["method"]) for d in diffs}, key=lambda k: (k[0], method_order(k[1]))):
        group = [d for d in diffs if d["dataset"] == ds and d["method"] == method]
        cells = []
        for key, _ in COLUMNS:
            v = np.array([d[key] for d in group], dtype=np.float64) * 100
            m, s = mean_std(v)
            cells.append(f"{m:+.1f} ± {s:.1f} ({int((v > 0).sum())}/{len(v)})")
        rows.append(f"| {ds} | {method} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def pairs_table(results: list[dict]) -> str:
    """Markdown: every pair's difference, so a reader sees where the mean comes from."""
    head = " | ".join(f"Δ {title}" for _, title in COLUMNS)
    rows = [f"| dataset | variant | split | seed | {head} |", "|---|---|---:|---:|" + "---:|" * len(COLUMNS)]
    for d in paired_differences(results):
        rows.append(f"| {d['dataset']} | {d['method']} | {d['split']} | {d['seed']} | "
                    + " | ".join(f"{d[key] * 100:+.1f}" for key, _ in COLUMNS) + " |")
    return "\n".join(rows) + "\n"


def results_table(results: list[dict]) -> str:
    """Markdown: one row per (dataset, method), mean ± std over its runs (splits x seeds)."""
    head = " | ".join(title for _, title in COLUMNS)
    rows = [f"| dataset | method | runs | {head} |", "|---|---|---:|" + "---:|" * len(COLUMNS)]
    for ds, method in sorted({(r["dataset"], r["method"]) for r in results}, key=lambda k: (k[0], method_order(k[1]))):
        rs = [r for r in results if r["dataset"] == ds and r["method"] == method]
        cells = []
        for key, _ in COLUMNS:
            m, s = mean_std(np.array([r["metrics"][key] for r in rs], dtype=np.float64) * 100)
            cells.append(f"{m:.1f} ± {s:.1f}")
        rows.append(f"| {ds} | {method} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def report(results: list[dict]) -> str:
    """results.md: the paired comparison first, then every pair, then each method on its own."""
    return ("Paired: BackMix variant − baseline on the same (split, seed), in points; mean ± std over the "
            "pairs (pairs where the variant is ahead / pairs).\n\n" + paired_table(results)
            + "\nEvery pair (variant − baseline, points):\n\n" + pairs_table(results)
            + "\nEach method: mean ± std over its runs (splits x seeds), in %:\n\n" + results_table(results))


def check_budget(results: list[dict], cfg: dict, results_path: Path) -> None:
    for r in results:
        differ = [f for f in BUDGET_FIELDS if r["config"].get(f) != cfg[f]]
        if differ:
            raise BackMixError(f"{results_path} holds runs of another budget ({differ[0]} "
                               f"{r['config'].get(differ[0])} there, {cfg[differ[0]]} asked); "
                               "choose another --out or the same budget")


def run_experiment(out: Path, datasets: list[str], splits: int, overrides: dict, *, seeds: int = 1,
                   keep_runs: bool = False, methods: tuple[str, ...] = ("baseline", "backmix"),
                   progress: bool = False) -> list[dict]:
    """Train every (data set, seed, split, method) not yet in OUT/results.jsonl; write OUT/results.md.

    Seeds are ``overrides["seed"]`` (default 0) and the ``seeds - 1`` after it; the loop runs a
    whole seed over every data set before the next, so a cut-short experiment still holds pairs.
    """
    for method in methods:
        if method not in METHODS:
            raise BackMixError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    for ds in datasets:
        if ds not in DATASETS:
            raise BackMixError(f"unknown data set {ds!r} (choose from {', '.join(DATASETS)})")
    if not 1 <= splits <= 5:
        raise BackMixError(f"--splits must lie in 1..5, got {splits}")
    if seeds < 1:
        raise BackMixError(f"--seeds must be at least 1, got {seeds}")
    base = {**EXPERIMENT_DEFAULTS, **BUDGETS["quick"], **overrides}
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    results = read_jsonl(results_path)   # a line cut by a kill is dropped: that run is redone
    check_budget(results, base, results_path)
    done = {(r["dataset"], r["split"], run_seed(r), r["method"]) for r in results}
    first_seed = base.get("seed", 0)
    todo = [(ds, split, seed, method) for seed in range(first_seed, first_seed + seeds) for ds in datasets
            for split in range(splits) for method in methods if (ds, split, seed, method) not in done]
    for ds in datasets:
        root = out / "data" / ds
        if prepare(ds, root):
            log.info("prepared %s in %s", ds, root)
    t_all = time.perf_counter()
    for ds, split, seed, method in tqdm(todo, desc="experiment runs", unit="run", disable=not progress):
        run_dir = out / "runs" / ds / f"split{split}" / f"seed{seed}" / method
        if run_dir.exists():   # left by an interrupted experiment: start it again
            shutil.rmtree(run_dir)
        cfg = TrainConfig(**{**base, "data": str(out / "data" / ds), "out": str(run_dir), "split": str(split),
                             "seed": seed, **METHODS[method], "progress": False})
        t0 = time.perf_counter()
        metrics = train_main(cfg)
        record = {"dataset": ds, "split": split, "seed": seed, "method": method,
                  "seconds": time.perf_counter() - t0, "config": cfg.to_dict(), "metrics": metrics}
        append_jsonl(results_path, record)
        results.append(record)
        if not keep_runs:   # checkpoints of 60 runs are not worth keeping by default
            for name in ("last.pt", "best.pt"):
                (run_dir / name).unlink(missing_ok=True)
            shutil.rmtree(run_dir / "cache", ignore_errors=True)
    text = report(results)
    atomic_write_bytes(out / "results.md", text.encode())
    log.info("experiment: %d runs in %.0fs", len(todo), time.perf_counter() - t_all)
    print(text, end="")
    return results


def register(top) -> None:
    p = top.add_parser("experiment", help="baseline vs BackMix over data sets, splits and seeds, paired",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="For each data set, seed and open-set split, train the plain baseline and "
                                   "BackMix with the same seed and budget; write DIR/results.jsonl (one line a "
                                   "run; finished runs are skipped when run again) and DIR/results.md (the "
                                   "paired differences variant - baseline first, then mean ± std of each "
                                   "method; AUROC and OSCR by maximum softmax probability (MSP) and by maximum "
                                   "logit (MLS)). Data sets are prepared under DIR/data if absent.")
    p.add_argument("--out", type=Path, required=True, help="experiment folder")
    p.add_argument("--datasets", default="digits,digits-on-photos", help="comma list of bundled data sets")
    p.add_argument("--splits", type=int, default=5, help="splits 0..N-1 of each data set")
    p.add_argument("--seeds", type=int, default=2,
                   help="training seeds --seed..--seed+N-1; each (split, seed) is one paired comparison")
    p.add_argument("--budget", choices=tuple(BUDGETS), default="converged",
                   help="epochs, width and lr of every run: " + "; ".join(
                       f"{name}: {b['epochs']} epochs, width {b['width']}, lr {b['lr']}" for name, b in BUDGETS.items()))
    # Not given: the --budget's value (SUPPRESS keeps argparse from printing "default: None").
    p.add_argument("--epochs", type=int, default=argparse.SUPPRESS, help="epochs a run (default: the budget's)")
    p.add_argument("--width", type=float, default=argparse.SUPPRESS,
                   help="cnn32 channel multiplier (default: the budget's)")
    p.add_argument("--lr", type=float, default=argparse.SUPPRESS, help="peak learning rate (default: the budget's)")
    p.add_argument("--arch", default=EXPERIMENT_DEFAULTS["arch"], help="model")
    p.add_argument("--backend", default="reference", help="loader")
    p.add_argument("--canvas-mode", choices=CANVAS_MODES, default="center",
                   help="canvas of each image: center = shorter side resized, centre square; stretch")
    p.add_argument("--augment", choices=AUGMENTS, default="crop",
                   help="after the mix: crop = random crop + flip; rrc = RandomResizedCrop + flip")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="training device")
    p.add_argument("--workers", type=int, default=EXPERIMENT_DEFAULTS["workers"],
                   help="decoding workers (0: decode in the training process; quickest for tiny images)")
    p.add_argument("--methods", default="baseline,backmix,backmix-mixed",
                   help=f"comma list of {', '.join(METHODS)}; results of other methods already in DIR stay "
                        "in the table")
    p.add_argument("--seed", type=int, default=0, help="first training seed, the same for every method of a pair")
    p.add_argument("--keep-runs", action="store_true", help="keep each run's checkpoints and cache")
    p.set_defaults(func=run_cli)


def run_cli(args) -> int:
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    given = {name: getattr(args, name) for name in BUDGETS[args.budget] if hasattr(args, name)}
    overrides = {**BUDGETS[args.budget], **given, "arch": args.arch, "backend": args.backend,
                 "device": args.device, "workers": args.workers, "seed": args.seed,
                 "canvas_mode": args.canvas_mode, "augment": args.augment}
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    run_experiment(args.out, datasets, args.splits, overrides, seeds=args.seeds, keep_runs=args.keep_runs,
                   methods=methods, progress=not args.quiet)
    return 0
