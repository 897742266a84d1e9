"""The tables of diagnosis.md, from the experiment's and the diagnostic runs' records.

    python docs/experiment/diagnosis_tables.py paired results.jsonl diagnosis.jsonl
    python docs/experiment/diagnosis_tables.py budget RUNS_ROOT
    python docs/experiment/diagnosis_tables.py maps diagnosis-maps.jsonl

paired: each diagnostic run (a results.jsonl row rerun with one override, diagnosis_runs.py) as a
variant named after its override, (1) against the experiment's baseline of the same data set, split
and seed, beside the experiment's own variant on the same pairs, and (2) against the experiment's run
of the same method (the override's effect alone). Reruns without an override show whether a rerun
reproduces the experiment's metrics. Formatting is the experiment's (bench/experiment_report.py).

budget: per data set and method, from every run's metrics.jsonl under RUNS_ROOT (the experiment's
runs/ folder): the validation accuracy at epochs 10/20/25/30, the best epoch, the train accuracy at
the end, and the last epoch's test accuracy (no selection on it).

maps: the rows of map_quality.py --json, per data set, box and generation: the mean over the runs
measured of precision (all / own photograph / other), recall and leak.
"""
import json
import sys
from pathlib import Path

import numpy as np

from backmix.bench.experiment_report import paired_table


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def variant(row: dict) -> str:
    return row["method"] + "".join(f" {k}={v}" for k, v in row["override"].items()) if row["override"] \
        else row["method"] + " (rerun)"


def paired(results_path: str, diagnosis_path: str) -> None:
    results, diagnosis = read_jsonl(results_path), read_jsonl(diagnosis_path)
    pairs = {(r["dataset"], r["split"], r["seed"]) for r in diagnosis}
    methods = {r["method"] for r in diagnosis}
    same = [r for r in results if (r["dataset"], r["split"], r["seed"]) in pairs
            and (r["method"] == "baseline" or r["method"] in methods)]
    renamed = [{**r, "method": variant(r)} for r in diagnosis]
    print("Against the experiment's baseline (same data set, split, seed):\n")
    print(paired_table(same + renamed))
    print("\nAgainst the experiment's run of the same method (the override alone):\n")
    as_baseline = [{**r, "method": "baseline"} for r in same if r["method"] in methods]
    print(paired_table(as_baseline + [r for r in renamed if not r["method"].endswith("(rerun)")]))
    print("\nEvery diagnostic run (test metrics of last.pt, %; best = the validation-selected epoch):\n")
    print("| data set | split | seed | variant | seconds | accuracy | AUROC (MLS) | OSCR (MLS) | best epoch | "
          "experiment's accuracy / AUROC (MLS) |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---|")
    by_key = {(r["dataset"], r["split"], r["seed"], r["method"]): r for r in results}
    for r in diagnosis:
        m, e = r["metrics"], by_key[(r["dataset"], r["split"], r["seed"], r["method"])]["metrics"]
        print(f"| {r['dataset']} | {r['split']} | {r['seed']} | {variant(r)} | {r['seconds']:.0f} | "
              f"{100 * m['accuracy']:.1f} | {100 * m['auroc_mls']:.1f} | {100 * m['oscr_mls']:.1f} | "
              f"{r['best']['epoch']} | {100 * e['accuracy']:.1f} / {100 * e['auroc_mls']:.1f} |")


def budget(root: str) -> None:
    groups: dict[tuple[str, str], list[list[dict]]] = {}
    for path in sorted(Path(root).glob("*/split*/seed*/*/metrics.jsonl")):
        dataset, method = path.parts[-5], path.parts[-2]
        groups.setdefault((dataset, method), []).append(read_jsonl(path))
    print("| data set | method | runs | val acc. @10 / @20 / @25 / @30 | best val epoch (mean; ≥ 25) | "
          "train acc. @30 | test acc. @30 |")
    print("|---|---|---:|---|---|---:|---:|")
    for (dataset, method), runs in sorted(groups.items()):
        val = np.array([[m["val"]["accuracy"] for m in run] for run in runs]) * 100
        # The best epoch as the trainer picks it: the first epoch of the highest validation accuracy.
        best = val.argmax(axis=1) + 1
        at = " / ".join(f"{val[:, e - 1].mean():.1f}" for e in (10, 20, 25, 30))
        train = np.mean([run[-1]["train_acc"] for run in runs]) * 100
        test = np.mean([run[-1]["eval"]["accuracy"] for run in runs]) * 100
        print(f"| {dataset} | {method} | {len(runs)} | {at} | {best.mean():.1f}; {(best >= 25).sum()}/{len(runs)} | "
              f"{train:.1f} | {test:.1f} |")


def maps(path: str) -> None:
    groups: dict[tuple, list[dict]] = {}
    for r in read_jsonl(path):
        groups.setdefault((r["dataset"], r["box_fraction"], r["generation"]), []).append(r)
    print("| data set | box | generation (built after epoch) | runs | precision all / own photo / other | "
          "recall | leak, box 0.25 / 0.5 |")
    print("|---|---:|---|---:|---|---:|---|")
    for (dataset, box, gen), rows in sorted(groups.items()):
        def mean(key):
            values = [r[key] for r in rows if r.get(key) is not None]
            return f"{np.mean(values):.3f}" if values else "-"
        epoch = rows[0]["built_after_epoch"]
        print(f"| {dataset} | {box} | {gen} ({epoch if epoch is not None else '-'}) | {len(rows)} | "
              f"{mean('precision')} / {mean('precision_own_photo')} / {mean('precision_other_photo')} | "
              f"{mean('recall')} | {mean('leak_box_0.25')} / {mean('leak_box_0.5')} |")


if __name__ == "__main__":
    {"paired": paired, "budget": budget, "maps": maps}[sys.argv[1]](*sys.argv[2:])
