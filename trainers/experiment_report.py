"""The experiment's report: results.md from the lines of results.jsonl.

Pure formatting, no training: the paired differences (each BackMix variant minus the
baseline of the same data set, split and seed) lead, then every pair, then each method
on its own. Metrics: closed-set accuracy, and AUROC and OSCR under each open-set score
(MSP, MLS, energy).
"""
from __future__ import annotations

import numpy as np

# The loss of each method: "baseline" CE on the clean crops, "backmix" CE on the clean and the mixed
# crops (the trainer's default), "backmix-mixed" CE on the mixed crops alone (the authors' recipe).
METHODS = {"baseline": {"backmix": False}, "backmix": {"backmix": True},
           "backmix-mixed": {"backmix": True, "w_raw": 0.0}}
# (results.jsonl key, column title) of the reported metrics, the scores side by side.
COLUMNS = (("accuracy", "accuracy"), ("auroc_msp", "AUROC (MSP)"), ("auroc_mls", "AUROC (MLS)"),
           ("auroc_energy", "AUROC (energy)"), ("oscr_msp", "OSCR (MSP)"), ("oscr_mls", "OSCR (MLS)"),
           ("oscr_energy", "OSCR (energy)"))


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


def report(results: list[dict], status: str = "") -> str:
    """results.md: ``status`` (how much of the plan has run), the paired comparison, every pair, then
    each method on its own."""
    return (status + "Paired: BackMix variant − baseline on the same (split, seed), in points; mean ± std over the "
            "pairs (pairs where the variant is ahead / pairs).\n\n" + paired_table(results)
            + "\nEvery pair (variant − baseline, points):\n\n" + pairs_table(results)
            + "\nEach method: mean ± std over its runs (splits x seeds), in %:\n\n" + results_table(results))
