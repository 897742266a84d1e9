"""Which runs ``backmix experiment`` trains, in which order, and how processes share them.

The default plan is the finished digits experiment: digits-on-photos
with 5 splits x 2 seeds x (baseline, backmix) plus the authors' mixed-only loss on
the first seed, and 5 splits x 1 seed x (baseline, backmix) on digits and on
digits-on-photos written with a stronger class-background prior (0.8). Runs are
ordered seed first, then split, data set and method, so a cut-short experiment holds
complete pairs of every data set rather than all of one.

Several processes may work on one experiment folder (the same command twice, or each
with its own ``--datasets``): a process claims a run before training it by writing
RUN/.claim (its pid and host) under the folder's lock, and skips runs that are
finished (in results.jsonl) or claimed by a live process. A claim whose process is
gone (killed) is taken over: its run resumes from its last checkpoint (the trainer's
``--resume``, bit for bit), or starts again when it saved none.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import NamedTuple, Optional

from backmix.osr_data.abandoned_temps import process_exists
from backmix.osr_data.errors import BackMixError
from backmix.osr_data.prepare import DATASETS

from .experiment_report import METHODS, method_order


class PlanEntry(NamedTuple):
    dataset: str
    seeds: tuple[int, ...]        # offsets from the experiment's first seed (--seed)
    methods: tuple[str, ...]


class Run(NamedTuple):
    dataset: str
    split: int
    seed: int
    method: str


DEFAULT_PLAN = (PlanEntry("digits-on-photos", (0, 1), ("baseline", "backmix")),
                PlanEntry("digits-on-photos", (0,), ("backmix-mixed",)),
                PlanEntry("digits", (0,), ("baseline", "backmix")),
                PlanEntry("digits-on-photos-p80", (0,), ("baseline", "backmix")))


def plan_text(plan: tuple[PlanEntry, ...], splits: int) -> str:
    return "; ".join(f"{e.dataset}: {splits} split{'s' if splits > 1 else ''} x seed{'s' if len(e.seeds) > 1 else ''} "
                     f"+{','.join(map(str, e.seeds))} x {', '.join(e.methods)}" for e in plan)


def make_plan(datasets: Optional[list[str]], seeds: Optional[int],
              methods: Optional[tuple[str, ...]]) -> tuple[PlanEntry, ...]:
    """The default plan, restricted to ``datasets``; ``seeds`` or ``methods`` (when given) replace every
    entry's by the same ones for every data set asked (default data sets: those of the plan)."""
    for method in methods or ():
        if method not in METHODS:
            raise BackMixError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    for ds in datasets or ():
        if ds not in DATASETS:
            raise BackMixError(f"unknown data set {ds!r} (choose from {', '.join(DATASETS)})")
    if seeds is not None and seeds < 1:
        raise BackMixError(f"--seeds must be at least 1, got {seeds}")
    names = list(dict.fromkeys(datasets or [e.dataset for e in DEFAULT_PLAN]))
    if seeds is None and methods is None:
        plan = tuple(e for e in DEFAULT_PLAN if e.dataset in names)
        missing = [ds for ds in names if ds not in {e.dataset for e in plan}]
        return plan + tuple(PlanEntry(ds, (0,), ("baseline", "backmix")) for ds in missing)
    return tuple(PlanEntry(ds, tuple(range(seeds or 1)), methods or ("baseline", "backmix")) for ds in names)


def user_plan(name: str, seeds: Optional[int], methods: Optional[tuple[str, ...]]) -> tuple[PlanEntry, ...]:
    """The plan of a user's data set: every method (or ``methods``), ``seeds`` seeds (default 1)."""
    for method in methods or ():
        if method not in METHODS:
            raise BackMixError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    if seeds is not None and seeds < 1:
        raise BackMixError(f"--seeds must be at least 1, got {seeds}")
    return (PlanEntry(name, tuple(range(seeds or 1)), methods or tuple(METHODS)),)


def plan_runs(plan: tuple[PlanEntry, ...], splits: int, first_seed: int = 0) -> list[Run]:
    """Every run of the plan, seed first, then split, data set (in plan order) and method."""
    order = list(dict.fromkeys(e.dataset for e in plan))
    runs = {Run(e.dataset, split, first_seed + s, m) for e in plan for s in e.seeds for m in e.methods
            for split in range(splits)}
    return sorted(runs, key=lambda r: (r.seed, r.split, order.index(r.dataset), method_order(r.method)))


def repeated_splits(runs: list[Run], known: dict[int, frozenset]) -> dict[Run, Run]:
    """Runs whose split has the same known classes as an earlier split (``known``: split -> its known
    class names), each mapped to that earlier split's run of the same data set, seed and method.
    The published CIFAR10 list has two such splits (0 and 1); a run is a pure function of its known
    classes and seed, so the earlier run's result is this one's and is not trained again."""
    first: dict[frozenset, int] = {}
    for split in sorted(known):
        first.setdefault(known[split], split)
    return {r: r._replace(split=first[known[r.split]]) for r in runs
            if r.split in known and first[known[r.split]] != r.split}


def run_dir(out: Path, run: Run) -> Path:
    return out / "runs" / run.dataset / f"split{run.split}" / f"seed{run.seed}" / run.method


def _claim_holder(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def claimed_by_another(out: Path, run: Run) -> bool:
    """True when a live process (not this one) holds the run's claim."""
    holder = _claim_holder(run_dir(out, run) / ".claim")
    if not holder or holder.get("host") != socket.gethostname():
        return bool(holder)   # a claim from another host is respected: its pid cannot be checked here
    return holder.get("pid") != os.getpid() and process_exists(int(holder.get("pid", -1)))


def claim(out: Path, run: Run) -> tuple[Path, Optional[float]]:
    """Claim ``run`` (call under the experiment's lock, after ``claimed_by_another`` said no) by writing
    RUN/.claim. An earlier, interrupted attempt that saved a checkpoint (RUN/last.pt) is kept, to be
    resumed; anything else it left is removed. Returns the folder and the seconds the kept attempt
    trained up to its checkpoint (from its claim to its last checkpoint; None when there is none)."""
    folder = run_dir(out, run)
    marker, checkpoint = folder / ".claim", folder / "last.pt"
    done_before = None
    if checkpoint.is_file() and marker.is_file():
        done_before = max(0.0, checkpoint.stat().st_mtime - marker.stat().st_mtime)
        marker.unlink()
    elif folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    if done_before is not None:   # the claim's time stands for when the run started, across attempts
        started = marker.stat().st_mtime - done_before
        os.utime(marker, (started, started))
    return folder, done_before
