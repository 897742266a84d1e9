"""Learning curves of `backmix train --eval-every 1` runs as one markdown table.

    python docs/experiment/learning_curves.py RUN [RUN ...]

A row per epoch; per run: validation accuracy / test accuracy / AUROC (MSP) / AUROC (MLS) / OSCR (MLS),
in %. Below the table, each run's plateau: the first epoch at which the 5-epoch moving average of its
validation accuracy (about 600 images: single epochs move by a point or two) comes within 1 point of
its highest value, the epoch from which more training no longer improves the selection metric.
"""
import json
import sys
from pathlib import Path

import numpy as np

KEYS = ("accuracy", "auroc_msp", "auroc_mls", "oscr_mls")
WINDOW, TOLERANCE = 5, 0.01


def plateau(val: list[float]) -> int:
    """1-based epoch at which the moving average of ``val`` first comes within TOLERANCE of its maximum."""
    v = np.asarray(val, dtype=np.float64)
    avg = np.array([v[max(0, i - WINDOW + 1):i + 1].mean() for i in range(len(v))])
    return int(np.flatnonzero(avg >= avg.max() - TOLERANCE)[0]) + 1


def main(runs: list[str]) -> None:
    lines = {run: [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
             for run in runs}
    print("| epoch | " + " | ".join(Path(run).name for run in runs) + " |")
    print("|---:|" + "---|" * len(runs))
    for epoch in range(max(len(v) for v in lines.values())):
        cells = []
        for run in runs:
            rec = lines[run][epoch] if epoch < len(lines[run]) else {}
            ev, val = rec.get("eval"), rec.get("val")
            cells.append(" / ".join([f"{val['accuracy'] * 100:.1f}" if val else "-"]
                                    + [f"{ev[k] * 100:.1f}" for k in KEYS]) if ev else "")
        print(f"| {epoch + 1} | " + " | ".join(cells) + " |")
    print()
    for run in runs:
        val = [r["val"]["accuracy"] for r in lines[run] if r.get("val")]
        if val:
            print(f"{Path(run).name}: validation accuracy plateaus at epoch {plateau(val)} of {len(val)} "
                  f"(5-epoch moving average within 1 point of its highest, {max(val) * 100:.1f} % at best)")


if __name__ == "__main__":
    main(sys.argv[1:])
