"""Map quality per cache generation of a digits-on-photos run, against the digits' true boxes.

    python docs/experiment/map_quality.py RUN --prior P [--json FILE]

RUN is a run folder of docs/experiment/diagnosis_runs.py (config.json, metrics.jsonl, and
generations/gen-*.arrow, every generation the run published). The data set is replayed
(``digits_on_photos(prior=P, seed=0)``, as `backmix data prepare` wrote it) to get each image's
digit box; every scored image is checked pixel for pixel against the file the run trained on, so
a wrong --prior or seed is refused rather than scored. Scored rows: the run's training rows
(known classes less the validation split). Per generation: the epoch it was built after, the
validation accuracy there, and precision / recall of the top-k cells
(``backmix.bench.map_quality``) over all images and apart for the images on their class's
own photograph (the background shortcut) and on another one; and the leak: the share of a pasted
patch (the run's box) that is the partner's digit left un-blanked, and what a box of 0.5 would carry.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from backmix.bench.map_quality import patch_leak, score_maps
from backmix.cam_cache.store import MappedMaps
from backmix.osr_data.composite import digits_on_photos
from backmix.osr_data.errors import BackMixError
from backmix.osr_data.open_set import load_data


def replayed_rows(cfg: dict, prior: float):
    """The run's training rows, their replayed image numbers, and the replayed data set."""
    data = load_data(cfg["data"], cfg["split"], cfg["val_fraction"], cfg["seed"])
    d = digits_on_photos(prior=prior, seed=0)
    rows = data.known_rows
    numbers = np.array([int(Path(data.train.paths[r]).stem) for r in rows])
    for r, i in zip(rows, numbers):
        if not np.array_equal(np.asarray(Image.open(data.train.abspath(r))), d["train_images"][i]):
            raise BackMixError(f"{data.train.abspath(r)} is not image {i} of digits_on_photos(prior={prior}, "
                               "seed=0): wrong --prior?")
    return rows, numbers, d


def build_epochs(run: Path) -> dict[int, dict]:
    """Generation -> the metrics line of the epoch after which it was built (its validation accuracy)."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {m["regenerated"]: m for m in lines if "regenerated" in m}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--prior", type=float, required=True, help="the data set's prior (0.5, or 0.8 for -p80)")
    p.add_argument("--json", type=Path, help="append one JSON row per generation to this file")
    args = p.parse_args(argv)
    if not (args.run / "config.json").is_file() or not (args.run / "generations").is_dir():
        raise BackMixError(f"{args.run} is not a run folder of diagnosis_runs.py (config.json, generations/)")
    cfg = json.loads((args.run / "config.json").read_text())
    rows, numbers, d = replayed_rows(cfg, args.prior)
    own = d["train_photos"][numbers] == d["class_photo"][d["train_labels"][numbers]]
    epochs = build_epochs(args.run)
    boxes = (cfg["box_fraction"], 0.5) if cfg["box_fraction"] != 0.5 else (0.5,)
    print(f"{args.run}: {len(rows)} training rows, {own.mean():.0%} on their class's own photograph; "
          f"top {cfg['top_k_ratio']:.0%} cells, box {cfg['box_fraction']}")
    print("| generation | built after epoch | val acc. there | precision (all / own photo / other) | "
          f"recall (all / own / other) | leak (box {' / '.join(map(str, boxes))}) |")
    print("|---:|---:|---:|---|---|---|")
    for path in sorted((args.run / "generations").glob("gen-*.arrow")):
        f = MappedMaps(path)
        position = np.full(int(f.rows.max()) + 1, -1)
        position[f.rows] = np.arange(len(f.rows))
        maps = np.asarray(f.maps[position[rows]], dtype=np.float32)
        s = score_maps(maps, d["train_boxes"][numbers], image_size=d["train_images"].shape[1],
                       top_k_ratio=cfg["top_k_ratio"])
        gen = int(f.meta["generation"])
        built = epochs.get(gen)
        row = {"run": str(args.run), "dataset": Path(cfg["data"]).name, "split": cfg["split"], "seed": cfg["seed"],
               "box_fraction": cfg["box_fraction"], "w_raw": cfg["w_raw"], "generation": gen,
               "built_after_epoch": built["epoch"] if built else None,
               "val_accuracy_at_build": built["val"]["accuracy"] if built else None,
               "images": len(rows), "own_photo_share": float(own.mean())}
        for key in ("precision", "recall"):
            row[key] = float(s[key].mean())
            row[f"{key}_own_photo"] = float(s[key][own].mean())
            row[f"{key}_other_photo"] = float(s[key][~own].mean())
            row[f"chance_{key}"] = float(s[f"chance_{key}"].mean())
        for box in boxes:
            row[f"leak_box_{box}"] = float(patch_leak(maps, d["train_boxes"][numbers], d["train_images"].shape[1],
                                                      cfg["canvas"], box, cfg["top_k_ratio"]).mean())
        print(f"| {gen} | {built['epoch'] if built else '-'} | "
              f"{built['val']['accuracy']:.3f} | " if built else f"| {gen} | - | - | ", end="")
        leaks = " / ".join(f"{row[f'leak_box_{box}']:.3f}" for box in boxes)
        print(f"{row['precision']:.3f} / {row['precision_own_photo']:.3f} / {row['precision_other_photo']:.3f} | "
              f"{row['recall']:.3f} / {row['recall_own_photo']:.3f} / {row['recall_other_photo']:.3f} | {leaks} |")
        if args.json:
            with open(args.json, "a") as out:
                out.write(json.dumps(row) + "\n")
    print(f"chance: precision {row['chance_precision']:.3f}, recall {row['chance_recall']:.3f}")


if __name__ == "__main__":
    try:
        main()
    except BackMixError as e:
        print(f"backmix: error: {e}", file=sys.stderr)
        sys.exit(2)
