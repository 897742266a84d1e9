"""Learning curves of `backmix train --eval-every 1` runs as one markdown table.

    python docs/experiment/learning_curves.py RUN [RUN ...]

A row per epoch; per run: test accuracy / AUROC (MSP) / AUROC (MLS) / OSCR (MLS), in %.
"""
import json
import sys
from pathlib import Path

KEYS = ("accuracy", "auroc_msp", "auroc_mls", "oscr_mls")


def main(runs: list[str]) -> None:
    lines = {run: [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
             for run in runs}
    print("| epoch | " + " | ".join(Path(run).name for run in runs) + " |")
    print("|---:|" + "---|" * len(runs))
    for epoch in range(max(len(v) for v in lines.values())):
        cells = []
        for run in runs:
            ev = lines[run][epoch].get("eval") if epoch < len(lines[run]) else None
            cells.append(" / ".join(f"{ev[k] * 100:.1f}" for k in KEYS) if ev else "")
        print(f"| {epoch + 1} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
