"""The experiment's report: results.md from the lines of results.jsonl.

Pure formatting, no training: the paired differences (each BackMix variant minus the
baseline of the same data set, split and seed) lead, then every pair, then each method
on its own. Metrics: closed-set accuracy, and AUROC and OSCR under each open-set score
(MSP, MLS, energy).
"""
from __future__ import annotations

import numpy as np

from backmix.trainers.methods import METHODS, forward_passes
# (results.jsonl key, column title) of the reported metrics, the scores side by side.
COLUMNS = (("accuracy", "accuracy"), ("auroc_msp", "AUROC (MSP)"), ("auroc_mls", "AUROC (MLS)"),
           ("auroc_energy", "AUROC (energy)"), ("oscr_msp", "OSCR (MSP)"), ("oscr_mls", "OSCR (MLS)"),
           ("oscr_energy", "OSCR (energy)"))


def run_seed(record: dict) -> int:
    return record["seed"]


def method_order(method: str) -> int:
    return list(METHODS).index(method) if method in METHODS else len(METHODS)


def mean_std(values: np.ndarray) -> tuple[float, float]:
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def passes(record: dict) -> int:
    """Forward/backward passes per training image of a run."""
    c = record["config"]
    return forward_passes(c["backmix"], c["w_raw"], c["views"], c["mix_prob"])


def matched_baseline(runs_passes: int) -> str:
    """The baseline of a method's compute: one forward pass per image is the plain baseline, two the
    two-view baseline."""
    return "baseline-2view" if runs_passes == 2 else "baseline"


def paired_differences(results: list[dict], against: str = "baseline") -> list[dict]:
    """One row per (dataset, variant, split, seed) that also has its reference run: variant - reference.
    ``against``: "baseline" (the plain baseline) or "compute" (the baseline of the variant's forward
    passes; BackMix variants only)."""
    records = {(r["dataset"], r["split"], run_seed(r), r["method"]): r for r in results}
    rows = []
    for (ds, split, seed, method), r in records.items():
        if method.startswith("baseline") and against == "compute":
            continue
        ref_method = matched_baseline(passes(r)) if against == "compute" else "baseline"
        ref = records.get((ds, split, seed, ref_method))
        if method == ref_method or ref is None:
            continue
        rows.append({"dataset": ds, "method": method, "reference": ref_method, "split": split, "seed": seed,
                     **{key: r["metrics"][key] - ref["metrics"][key] for key, _ in COLUMNS}})
    return sorted(rows, key=lambda r: (r["dataset"], method_order(r["method"]), r["split"], r["seed"]))


def paired_table(results: list[dict], against: str = "baseline") -> str:
    """Markdown: per (dataset, variant), mean ± std of variant - reference over the pairs, and pairs ahead."""
    diffs = paired_differences(results, against)
    head = " | ".join(f"Δ {title}" for _, title in COLUMNS)
    rows = [f"| dataset | variant − reference | pairs | {head} |", "|---|---|---:|" + "---:|" * len(COLUMNS)]
    for ds, method in sorted({(d["dataset"], d["method"]) for d in diffs}, key=lambda k: (k[0], method_order(k[1]))):
        group = [d for d in diffs if d["dataset"] == ds and d["method"] == method]
        cells = []
        for key, _ in COLUMNS:
            v = np.array([d[key] for d in group], dtype=np.float64) * 100
            m, s = mean_std(v)
            cells.append(f"{m:+.1f} ± {s:.1f} ({int((v > 0).sum())}/{len(v)})")
        rows.append(f"| {ds} | {method} − {group[0]['reference']} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def pairs_table(results: list[dict]) -> str:
    """Markdown: every pair's difference from the plain baseline, so a reader sees where the mean comes from."""
    head = " | ".join(f"Δ {title}" for _, title in COLUMNS)
    rows = [f"| dataset | variant | split | seed | {head} |", "|---|---|---:|---:|" + "---:|" * len(COLUMNS)]
    for d in paired_differences(results):
        rows.append(f"| {d['dataset']} | {d['method']} | {d['split']} | {d['seed']} | "
                    + " | ".join(f"{d[key] * 100:+.1f}" for key, _ in COLUMNS) + " |")
    return "\n".join(rows) + "\n"


def results_table(results: list[dict]) -> str:
    """Markdown: one row per (dataset, method), mean ± std over its runs (splits x seeds)."""
    head = " | ".join(title for _, title in COLUMNS)
    rows = [f"| dataset | method | runs | passes per image | minutes per run | {head} |",
            "|---|---|---:|---:|---:|" + "---:|" * len(COLUMNS)]
    for ds, method in sorted({(r["dataset"], r["method"]) for r in results}, key=lambda k: (k[0], method_order(k[1]))):
        rs = [r for r in results if r["dataset"] == ds and r["method"] == method]
        cells = []
        for key, _ in COLUMNS:
            m, s = mean_std(np.array([r["metrics"][key] for r in rs], dtype=np.float64) * 100)
            cells.append(f"{m:.1f} ± {s:.1f}")
        minutes = np.mean([r["seconds"] for r in rs]) / 60
        rows.append(f"| {ds} | {method} | {len(rs)} | {passes(rs[0])} | {minutes:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def scored_sets(results: list[dict]) -> list[dict]:
    """The report's rows: each run against its split's held-out classes (when it has any), and against each
    ``--open-test`` set as the data set "DATA vs SET" (the same closed-set accuracy, that set's unknowns)."""
    rows = []
    for r in results:
        if all(key in r["metrics"] for key, _ in COLUMNS):
            rows.append(r)
        for name, m in sorted(r["metrics"].get("open_test", {}).items()):
            rows.append({**r, "dataset": f"{r['dataset']} vs {name}", "metrics": m})
    return rows


def report(results: list[dict], status: str = "") -> str:
    """results.md: ``status`` (how much of the plan has run), each BackMix variant against the baseline of
    its own compute, then against the plain baseline, every pair, then each method on its own."""
    text = status
    results = scored_sets(results)
    if any(r["method"].startswith("backmix") for r in results) and any(r["method"] == "baseline-2view" for r in results):
        text += ("At equal compute: each BackMix variant − the baseline of the same forward passes per image "
                 "(clean + mixed: two passes, against baseline-2view; mixed only and mix prob: one pass, "
                 "against baseline) on the same (split, seed), in points; mean ± std over the pairs (pairs "
                 "where the variant is ahead / pairs).\n\n" + paired_table(results, "compute") + "\n")
    return (text + "Against the plain baseline (one pass per image) on the same (split, seed), in points; mean "
            "± std over the pairs (pairs where the variant is ahead / pairs).\n\n" + paired_table(results)
            + "\nEvery pair (variant − baseline, points):\n\n" + pairs_table(results)
            + "\nEach method: mean ± std over its runs (splits x seeds), in %; forward/backward passes per "
            "training image, and wall minutes per run:\n\n" + results_table(results))
