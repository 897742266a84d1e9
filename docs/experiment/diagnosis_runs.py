"""Diagnostic reruns of the experiment: one results.jsonl row's config with ONE override.

    PYTHONPATH=/work/frozen/exp OMP_NUM_THREADS=1 nice -n 19 \
        python docs/experiment/diagnosis_runs.py OUT ROWS.jsonl DATASET:SPLIT:SEED:METHOD KEY=VALUE [...]

Each job DATASET:SPLIT:SEED:METHOD picks the experiment's row (e.g. digits-on-photos-p80:0:0:backmix),
rebuilds its TrainConfig with the override KEY=VALUE (a JSON value, e.g. box_fraction=0.5; `none`
reruns it as it was) and trains it the way `backmix experiment` does (``train_main(cfg)``), so the
only difference from the experiment's run is the override. The run folder is
OUT/DATASET/splitN/seedS/METHOD[-KEY-VALUE]; every cache generation the run publishes is copied to
its generations/ folder (the trainer keeps only the last 3) for the map-quality measurement. A
finished run appends one row to OUT/diagnosis.jsonl: the experiment's row fields, the override,
seconds, config, the test metrics of last.pt and the best (validation-selected) epoch.
"""
import json
import shutil
import sys
import threading
import time
from pathlib import Path

from backmix.trainers.config import TrainConfig
from backmix.trainers.train import main as train_main


def snapshot_generations(cache: Path, keep: Path, stop: threading.Event) -> None:
    """Copy each gen-*.arrow the trainer publishes before its cache drops it (it keeps 3)."""
    keep.mkdir(parents=True, exist_ok=True)
    while True:
        for path in sorted(cache.glob("gen-*.arrow")) if cache.is_dir() else ():
            target = keep / path.name
            if not target.exists():
                try:
                    shutil.copyfile(path, target.with_suffix(".tmp"))
                    target.with_suffix(".tmp").rename(target)
                except FileNotFoundError:   # dropped between glob and copy: nothing to keep
                    pass
        if stop.is_set():
            return
        stop.wait(2.0)


def run_job(out: Path, rows: list[dict], job: str, override: str) -> None:
    dataset, split, seed, method = job.split(":")
    row = next(r for r in rows if (r["dataset"], r["split"], r["seed"], r["method"])
               == (dataset, int(split), int(seed), method))
    key, _, value = override.partition("=")
    changes = {} if override == "none" else {key: json.loads(value)}
    name = method if not changes else f"{method}-{key}-{value}"
    folder = out / dataset / f"split{split}" / f"seed{seed}" / name
    if (folder / "summary.json").exists():
        print(f"done already: {folder}", flush=True)
        return
    cfg = TrainConfig(**{**row["config"], **changes, "out": str(folder), "progress": False})
    stop = threading.Event()
    watcher = threading.Thread(target=snapshot_generations, args=(cfg.cache_dir, folder / "generations", stop))
    watcher.start()
    t0 = time.perf_counter()
    try:
        metrics = train_main(cfg)
    finally:
        stop.set()
        watcher.join()
    summary = json.loads((folder / "summary.json").read_text())
    record = {"dataset": dataset, "split": int(split), "seed": int(seed), "method": method,
              "override": changes, "seconds": time.perf_counter() - t0, "config": cfg.to_dict(),
              "metrics": metrics, "best": summary["best"]}
    with open(out / "diagnosis.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"done {job} {override} in {record['seconds']:.0f}s: accuracy {metrics['accuracy']:.4f} "
          f"AUROC (MLS) {metrics['auroc_mls']:.4f}", flush=True)


def main(argv: list[str]) -> None:
    out, rows_path, pairs = Path(argv[0]), Path(argv[1]), argv[2:]
    rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()]
    out.mkdir(parents=True, exist_ok=True)
    import backmix
    print(f"backmix from {Path(backmix.__file__).parent}", flush=True)   # the frozen code, not a checkout
    for job, override in zip(pairs[::2], pairs[1::2]):
        run_job(out, rows, job, override)


if __name__ == "__main__":
    main(sys.argv[1:])
