"""``backmix experiment``: baseline vs BackMix, paired per (split, seed), on every data set.

The methods of a (split, seed) share seed, model, schedule, epochs and validation
rows; only the loss differs (``experiment_report.METHODS``). A (split, seed) is
therefore one paired comparison, and the report leads with the paired differences
(each BackMix variant minus the baseline) because the spread over splits is larger
than the gaps between methods. Which runs, in which order, and how two processes
share one folder: ``experiment_plan``. Each finished run is one line of
DIR/results.jsonl (appended under the folder's lock; results.md is regenerated
from the file after every run), so an interrupted experiment continues where it
stopped (its unfinished run resumes from its last checkpoint). DIR/experiment.log gets a line
as each run starts and ends, and the trainer's progress.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from backmix._fs import atomic_write_bytes, check_output_folder
from backmix.options import DefaultsFormatter, add_options
from backmix.osr_data.errors import BackMixError
from backmix.osr_data.filelock import exclusive_lock
from backmix.osr_data.prepare import prepare
from backmix.osr_data.protocols import PROTOCOLS, split_list
from backmix.osr_data.splits import split_number
from backmix.trainers.config import TrainConfig
from backmix.trainers.config_file import write_config_yaml
from backmix.trainers.run_files import append_jsonl, read_jsonl
from backmix.trainers.train import main as train_main

from .experiment_plan import (DEFAULT_PLAN, claim, claimed_by_another, make_plan, plan_runs, plan_text,
                              repeated_splits, run_dir, user_plan)
from .experiment_report import METHODS, report, run_seed

log = logging.getLogger("backmix")

# Budgets: "quick" is the 10-epoch budget of the first experiment (smoke runs); "converged" is where the
# baseline's test accuracy and AUROC have stopped rising (docs/experiment/learning-curves.md).
BUDGETS = {"quick": dict(epochs=10, width=0.5, lr=0.05),
           "converged": dict(epochs=30, width=0.5, lr=0.05)}
EXPERIMENT_DEFAULTS = dict(arch="cnn32", batch_size=64, regen_every=2, eval_every=0, workers=0, val_fraction=0.1,
                           protocol=None)
# A folder's finished runs are reused only under the same budget: these fields must match.
BUDGET_FIELDS = ("epochs", "width", "lr", "arch", "batch_size", "val_fraction", "protocol", "splits_file")
# The loader's geometry is part of what a run learnt from (the crops it saw, the boxes it pasted): runs
# of another augment or canvas are another experiment, however equal their budget.
GEOMETRY_FIELDS = ("augment", "canvas_mode", "canvas", "crop", "grid", "box_fraction", "top_k_ratio")
# What a line of results.jsonl holds: a line without these is not a run this command wrote.
RESULT_KEYS = {"dataset": str, "split": int, "method": str, "config": dict, "metrics": dict}
# What an earlier backmix's lines lack: the run's seed, and its config's validation share, views and
# mix probability (the budget check and the report read them).
LATER_RESULT_KEYS, LATER_CONFIG_KEYS = ("seed",), ("val_fraction", "views", "mix_prob")


def check_budget(results: list[dict], cfg: dict, results_path: Path) -> None:
    """The runs in ``results_path`` were trained under ``cfg``'s budget and loader geometry (``cfg``: a
    whole ``TrainConfig.to_dict()``), else the folder is refused: its table would mix two experiments."""
    for r in results:
        differ = [f for f in BUDGET_FIELDS + GEOMETRY_FIELDS if r["config"].get(f) != cfg[f]]
        if differ:
            raise BackMixError(f"{results_path} holds runs of another budget ({differ[0]} "
                               f"{r['config'].get(differ[0])} there, {cfg[differ[0]]} asked); "
                               "choose another --out or the same budget")


def read_results(path: Path) -> list[dict]:
    """The runs of DIR/results.jsonl (a line cut short by a kill is dropped: that run is redone); a
    complete line that is not a run's result is refused, naming it, rather than read as one."""
    results = read_jsonl(path)
    for number, r in enumerate(results, 1):
        wrong = next((k for k, kind in RESULT_KEYS.items() if not isinstance(r, dict) or not isinstance(r.get(k), kind)),
                     None)
        if wrong is not None:
            raise BackMixError(f"{path}: result {number} is not a run of `backmix experiment` (its {wrong!r} is "
                               "missing or of another type); remove that line or choose another --out")
        lacks = [k for k in LATER_RESULT_KEYS if k not in r] + [f"config.{k}" for k in LATER_CONFIG_KEYS
                                                               if k not in r["config"]]
        if lacks:
            raise BackMixError(f"{path}: result {number} was written by an earlier backmix (it has no {lacks[0]}): "
                               "`backmix experiment` with another --out rewrites it")
    return results


def note(out: Path, text: str) -> None:
    """One line of DIR/experiment.log (appended whole: several processes may write it)."""
    log.info("%s", text, extra={"noted": True})   # the file handler below leaves it to this line
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    with open(out / "experiment.log", "a") as f:
        f.write(f"{stamp} UTC [pid {os.getpid()}] {text}\n")


def status_line(results: list[dict], runs: list, plan_desc: str) -> str:
    done = {(r["dataset"], r["split"], run_seed(r), r["method"]) for r in results}
    n = sum(tuple(r) in done for r in runs)
    if n == len(runs):
        return f"Complete: all {len(runs)} runs of the plan ({plan_desc}).\n\n"
    return f"**Partial**: {n} of {len(runs)} runs of the plan ({plan_desc}).\n\n"


class _Console(logging.Handler):
    """Passes the records the console would have shown (its level before ``progress_log``) on to it."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger().handle(record)


@contextlib.contextmanager
def progress_log(path: Path):
    """The trainer's INFO lines (epochs, rebuilds) also go to ``path``, even under ``-q``; the console
    shows what it showed before."""
    file = logging.FileHandler(path)
    file.setFormatter(logging.Formatter("%(asctime)s UTC [pid %(process)d] %(message)s"))
    file.formatter.converter = time.gmtime
    file.addFilter(lambda record: not getattr(record, "noted", False))   # note() writes those itself
    console = _Console(log.getEffectiveLevel())
    saved = log.level, log.propagate
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in (file, console):
        log.addHandler(h)
    try:
        yield
    finally:
        for h in (file, console):
            log.removeHandler(h)
        file.close()
        log.setLevel(saved[0])
        log.propagate = saved[1]


def train_under_torchrun(cfg: TrainConfig, nproc: int, resume: bool) -> dict:
    """One run as ``torchrun --standalone --nproc-per-node N -m backmix train --config RUN/asked.yaml``; its
    metrics are those RUN/summary.json gives for the last epoch (what ``train_main`` returns in-process)."""
    asked = Path(cfg.out) / "asked.yaml"
    write_config_yaml(asked, cfg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "backmix", "-q", "train", "--config", str(asked)] + (["--resume"] if resume else [])
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        said = [line for line in done.stderr.splitlines() if line.startswith("backmix: error: ")]
        raise BackMixError(f"the torchrun of {cfg.out} failed (exit status {done.returncode})"
                           + (f": {said[-1].removeprefix('backmix: error: ')}" if said else ""))
    return json.loads((Path(cfg.out) / "summary.json").read_text())["last"]["test"]


def known_sets(listed, splits: int) -> dict[int, frozenset]:
    """Split -> its known class names, for a split list (none for random splits: they differ)."""
    if listed is None:
        return {}
    return {k: frozenset(listed.entries[k][0]) for k in range(min(splits, len(listed.entries)))}


def copy_repeats(results_path: Path, results: list[dict], repeats: dict, done: set) -> list:
    """Append, for each repeated split whose earlier run is finished, that run's result under the repeated
    split's number (marked ``same_run_as``); call under the folder's lock. Returns the runs written."""
    by_key = {(r["dataset"], r["split"], run_seed(r), r["method"]): r for r in results}
    written = []
    for repeat, source in repeats.items():
        if tuple(repeat) in done or tuple(source) not in by_key:
            continue
        record = {**by_key[tuple(source)], "split": repeat.split, "same_run_as": {"split": source.split}}
        record["config"] = {**record["config"], "split": str(repeat.split)}
        append_jsonl(results_path, record)
        results.append(record)
        written.append(repeat)
    return written


def run_experiment(out: Path, datasets: Optional[list[str]] = None, splits: Optional[int] = 5,
                   overrides: Optional[dict] = None, *, seeds: Optional[int] = None, keep_runs: bool = False,
                   methods: Optional[tuple[str, ...]] = None, progress: bool = False,
                   data: Optional[Path] = None, nproc_per_node: int = 1) -> list[dict]:
    """Train every run of the plan (``experiment_plan``) not yet in OUT/results.jsonl; write OUT/results.md.
    Returns every run in results.jsonl.

    Seeds are ``overrides["seed"]`` (default 0) plus each plan entry's offsets; ``seeds``/``methods``
    replace the default plan's by the same ones for every data set. ``data``: a prepared root of the
    user's instead of the bundled data sets (named by ``overrides["protocol"]`` when given, else by
    its folder), every method by default; its splits may come from ``overrides["protocol"]`` or
    ``overrides["splits_file"]`` (``splits`` None: all of the list's). ``nproc_per_node`` > 1: each run
    is a ``torchrun`` of ``backmix train`` with that many processes. Safe to run in several processes
    on one OUT: each claims its next run under the folder's lock.
    """
    out = Path(out)
    if data is not None:
        if datasets:
            raise BackMixError("--data and --datasets both name the data; give one of them")
        name = (overrides or {}).get("protocol") or Path(data).resolve().name
        plan = user_plan(name, seeds, methods)
    else:
        plan = make_plan(datasets, seeds, methods)
    base = {**EXPERIMENT_DEFAULTS, **BUDGETS["quick"], **(overrides or {})}
    asked = TrainConfig(**base).to_dict()   # a bad value is one line now, not after the data sets are prepared
    listed = split_list(base.get("protocol"), base.get("splits_file"))
    most = len(listed.entries) if listed is not None else 5
    splits = most if splits is None else splits
    if not 1 <= splits <= most:
        raise BackMixError(f"--splits must lie in 1..{most}, got {splits}")
    if not 1 <= nproc_per_node <= 1024:
        raise BackMixError(f"--nproc-per-node must lie in 1..1024, got {nproc_per_node}")
    runs = plan_runs(plan, splits, base.get("seed", 0))
    repeats = repeated_splits(runs, known_sets(listed, splits))
    plan_desc = plan_text(plan, splits) + "; budget " + ", ".join(f"{f} {asked[f]}" for f in BUDGET_FIELDS if asked[f] is not None)
    check_output_folder(out, "--out", "an experiment")
    results_path = out / "results.jsonl"
    check_budget(read_results(results_path), asked, results_path)
    roots = {ds: Path(data) if data is not None else out / "data" / ds for ds in dict.fromkeys(r.dataset for r in runs)}
    for ds, root in roots.items():
        if data is not None:
            continue
        root.parent.mkdir(exist_ok=True)
        with exclusive_lock(root):   # another process may be preparing it
            if prepare(ds, root):
                log.info("prepared %s in %s", ds, root)
    t_all, trained = time.perf_counter(), 0
    with progress_log(out / "experiment.log"), \
            tqdm(total=len(runs), desc="experiment runs", unit="run", disable=not progress) as bar:
        while True:
            with exclusive_lock(results_path):
                results = read_results(results_path)
                check_budget(results, asked, results_path)
                done = {(r["dataset"], r["split"], run_seed(r), r["method"]) for r in results}
                for repeat in copy_repeats(results_path, results, repeats, done):
                    note(out, f"split {repeat.split} of {repeat.dataset} seed {repeat.seed} {repeat.method}: "
                              f"the known classes of split {repeats[repeat].split}, whose run it takes")
                    done.add(tuple(repeat))
                bar.n = sum(tuple(r) in done for r in runs)
                bar.refresh()
                run = next((r for r in runs if tuple(r) not in done and r not in repeats
                            and not claimed_by_another(out, r)), None)
                if run is None:
                    break
                folder, done_before = claim(out, run)
            note(out, f"start {run.dataset} split {run.split} seed {run.seed} {run.method} "
                      f"({len(done)} of {len(runs)} runs done)")
            cfg = TrainConfig(**{**base, "data": str(roots[run.dataset]), "out": str(folder),
                                 "split": str(run.split), "seed": run.seed, **METHODS[run.method],
                                 "progress": False})
            t0 = time.perf_counter()
            if done_before is not None:
                note(out, f"resume {run.dataset} split {run.split} seed {run.seed} {run.method} from its checkpoint")
            if nproc_per_node > 1:
                metrics = train_under_torchrun(cfg, nproc_per_node, resume=done_before is not None)
            else:
                metrics = train_main(cfg, resume=done_before is not None)
            summary = json.loads((folder / "summary.json").read_text())
            record = {"dataset": run.dataset, "split": run.split, "seed": run.seed, "method": run.method,
                      "seconds": (done_before or 0.0) + time.perf_counter() - t0, "nproc_per_node": nproc_per_node,
                      "config": cfg.to_dict(), "metrics": metrics,
                      "best": summary["best"]}
            with exclusive_lock(results_path):
                append_jsonl(results_path, record)
                results = read_results(results_path)
                atomic_write_bytes(out / "results.md", report(results, status_line(results, runs, plan_desc)).encode())
            trained += 1
            note(out, f"done {run.dataset} split {run.split} seed {run.seed} {run.method} in "
                      f"{record['seconds']:.0f}s: accuracy {metrics['accuracy']:.4f} AUROC (MLS) "
                      f"{metrics['auroc_mls']:.4f} OSCR (MLS) {metrics['oscr_mls']:.4f}")
            (folder / ".claim").unlink(missing_ok=True)
            if not keep_runs:   # checkpoints of 45 runs are not worth keeping by default
                for name in ("last.pt", "best.pt"):
                    (folder / name).unlink(missing_ok=True)
                shutil.rmtree(folder / "cache", ignore_errors=True)
    with exclusive_lock(results_path):
        results = read_results(results_path)
        text = report(results, status_line(results, runs, plan_desc))
        atomic_write_bytes(out / "results.md", text.encode())
    note(out, f"this process trained {trained} runs in {time.perf_counter() - t_all:.0f}s; "
              f"{status_line(results, runs, plan_desc).strip()}")
    print(text, end="")
    return results


def register(top) -> None:
    p = top.add_parser("experiment", help="baseline vs BackMix over data sets, splits and seeds, paired",
                       formatter_class=DefaultsFormatter,
                       description="For each data set, seed and open-set split, train the plain baseline and "
                                   "BackMix with the same seed, budget and validation rows; write "
                                   "DIR/results.jsonl (one line a run; finished runs are skipped when run "
                                   "again), DIR/results.md (the paired differences variant - baseline first, "
                                   "then mean ± std of each method; AUROC and OSCR by maximum softmax "
                                   "probability (MSP), maximum logit (MLS) and energy) and DIR/experiment.log. "
                                   "The default plan: " + plan_text(DEFAULT_PLAN, 5) + ". Several processes "
                                   "may share one DIR (each claims its next run). Data sets are prepared "
                                   "under DIR/data if absent. --canvas-mode and --augment are part of the "
                                   "budget: runs of another value in DIR are not mixed in.")
    p.add_argument("--out", type=Path, required=True, help="experiment folder")
    p.add_argument("--datasets", default=None,
                   help="comma list of bundled data sets (default: those of the plan); the plan's runs of them")
    p.add_argument("--data", type=Path, default=None, metavar="ROOT",
                   help="a prepared root of your own (train/ and test/ class folders) instead of the bundled "
                        "data sets; every method by default (" + ", ".join(METHODS) + ")")
    p.add_argument("--protocol", choices=PROTOCOLS, default=None,
                   help="with --data: the published split list whose splits 0..N-1 are run (e.g. cifar10, the "
                        "ARPL splits); it also names the data set in the report")
    p.add_argument("--splits", default=None, metavar="N|FILE",
                   help="N: splits 0..N-1 of each data set (default: 5, or all of the --protocol list's); FILE "
                        "(with --data): a JSON split list, as `backmix train --splits FILE` reads, all its splits")
    p.add_argument("--open-test", action="append", default=[], metavar="DIR",
                   help="a folder of unknown classes every run is also scored against (repeatable; see `backmix "
                        "train --help`); the report gives each set its own rows, \"DATA vs NAME\" (NAME: the folder's name)")
    p.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                   help="run each training under torchrun with N processes on this machine")
    p.add_argument("--seeds", type=int, default=None,
                   help="training seeds --seed..--seed+N-1 for every data set and method, instead of the plan's; "
                        "each (split, seed) is one paired comparison")
    p.add_argument("--budget", choices=tuple(BUDGETS), default="converged",
                   help="epochs, width and lr of every run: " + "; ".join(
                       f"{name}: {b['epochs']} epochs, width {b['width']}, lr {b['lr']}" for name, b in BUDGETS.items()))
    # Not given: the --budget's value (SUPPRESS keeps argparse from printing "default: None").
    p.add_argument("--epochs", type=int, default=argparse.SUPPRESS, help="epochs a run (default: the budget's)")
    p.add_argument("--width", type=float, default=argparse.SUPPRESS,
                   help="cnn32 channel multiplier (default: the budget's)")
    p.add_argument("--lr", type=float, default=argparse.SUPPRESS, help="peak learning rate (default: the budget's)")
    p.add_argument("--arch", default=EXPERIMENT_DEFAULTS["arch"], help="model")
    # 0 workers: decode in the training process, the quickest for the bundled tiny images
    add_options(p, ("backend", "canvas_mode", "augment", "device", "workers"),
                defaults={"workers": EXPERIMENT_DEFAULTS["workers"]})
    p.add_argument("--methods", default=None,
                   help=f"comma list of {', '.join(METHODS)} for every data set, instead of the plan's; results "
                        "of other methods already in DIR stay in the table")
    p.add_argument("--val-fraction", type=float, default=EXPERIMENT_DEFAULTS["val_fraction"],
                   help="share of each known class's training images held out to select best.pt (see "
                        "`backmix train --help`); part of the budget: runs of another value are not mixed in")
    p.add_argument("--seed", type=int, default=0, help="first training seed, the same for every method of a pair")
    p.add_argument("--keep-runs", action="store_true", help="keep each run's checkpoints and cache")
    p.set_defaults(func=run_cli)


def run_cli(args) -> int:
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()] if args.datasets else None
    given = {name: getattr(args, name) for name in BUDGETS[args.budget] if hasattr(args, name)}
    overrides = {**BUDGETS[args.budget], **given, "arch": args.arch, "backend": args.backend,
                 "device": args.device, "workers": args.workers, "seed": args.seed,
                 "canvas_mode": args.canvas_mode, "augment": args.augment, "val_fraction": args.val_fraction}
    if args.protocol:
        if args.data is None:
            raise BackMixError("--protocol names the splits of a --data folder: give --data too")
        overrides["protocol"] = args.protocol
    splits = 5 if args.splits is None and not args.protocol else args.splits
    if args.splits is not None and split_number(args.splits) is None:   # a file of splits
        if args.data is None or args.protocol:
            raise BackMixError("--splits FILE names the splits of a --data folder: give --data, and not --protocol")
        overrides["splits_file"], splits = str(args.splits), None
    elif args.splits is not None:
        splits = split_number(args.splits)
    if args.open_test:
        overrides["open_test"] = list(args.open_test)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods else None
    run_experiment(args.out, datasets, splits, overrides, seeds=args.seeds, keep_runs=args.keep_runs,
                   methods=methods, progress=not args.quiet, data=args.data, nproc_per_node=args.nproc_per_node)
    return 0
