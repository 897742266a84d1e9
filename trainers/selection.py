"""Model selection on the validation split, and the run's summary naming each checkpoint.

``best.pt`` is the epoch with the highest closed-set accuracy on the validation rows
(``backmix.osr_data.holdout``); the test folder is evaluated for reporting only and
never read to choose. Without validation rows (``--val-fraction 0``) best.pt is the
last epoch: there is nothing honest to select on.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

SELECTED_BY = "validation closed-set accuracy"


def validation_metrics(logits: torch.Tensor, dataset_labels: torch.Tensor, label_map: np.ndarray) -> dict:
    """Closed-set accuracy and cross-entropy on validation images (all of known classes)."""
    y = torch.from_numpy(label_map)[dataset_labels]
    return {"accuracy": float((logits.argmax(1) == y).double().mean()),
            "loss": float(F.cross_entropy(logits.double(), y)), "images": int(y.numel())}


def best_epoch(history: list[dict]) -> Optional[int]:
    """The first epoch of highest validation accuracy; None when no epoch was validated."""
    scored = [(r["val"]["accuracy"], -r["epoch"]) for r in history if "val" in r]
    return -max(scored)[1] if scored else None


def run_summary(history: list[dict], best_test: dict) -> dict:
    """RUN/summary.json: the test metrics of last.pt and of best.pt, and how best.pt was chosen."""
    last = history[-1]
    chosen = best_epoch(history)
    by_epoch = {r["epoch"]: r for r in history}
    best = by_epoch[chosen] if chosen is not None else last
    return {"last": {"epoch": last["epoch"], "val": last.get("val"), "test": last.get("eval", {})},
            "best": {"epoch": best["epoch"], "val": best.get("val"), "test": best_test,
                     "selected_by": SELECTED_BY if chosen is not None else "none (no validation rows): the last epoch"}}


def summary_line(out: str, method: str, arch: str, epochs: int, summary: dict) -> str:
    """The closing line of a run: which checkpoint each figure is of."""
    parts = []
    for name in ("last", "best"):
        s = summary[name]
        t = s["test"]
        val = f", val acc {s['val']['accuracy']:.4f}" if s.get("val") else ""
        others = "".join(f"  vs {unknowns}: AUROC (MSP) {m['auroc_msp']:.4f}  OSCR {m['oscr_msp']:.4f}"
                         for unknowns, m in t.get("open_test", {}).items())
        held_out = f"  AUROC (MSP) {t['auroc_msp']:.4f}  OSCR {t['oscr_msp']:.4f}" if "auroc_msp" in t else ""
        parts.append(f"{name}.pt (epoch {s['epoch']}{val}): test accuracy {t['accuracy']:.4f}{held_out}{others}")
    return f"{out}: {method} {arch}, {epochs} epochs: " + "; ".join(parts)
