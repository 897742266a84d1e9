"""``backmix bench train``: whole training steps of each recipe, read against the baselines."""
from __future__ import annotations

import json
import statistics

from backmix.cli import main as cli_main


def test_bench_train_reports_each_recipe_against_the_baseline_of_its_passes(tiny_root, tmp_path, capsys):
    out = tmp_path / "train.json"
    args = ["bench", "train", "--data", str(tiny_root), "--backend", "reference", "--methods", "backmix,backmix-p50",
            "--steps", "2", "--warmup", "1", "--rounds", "2", "--batch-size", "8", "--workers", "0",
            "--device", "cpu", "--json", str(out)]
    assert cli_main(args) == 0
    report = json.loads(out.read_text())
    rows = {r["method"]: r for r in report["results"]}
    assert list(rows) == ["baseline", "backmix", "backmix-p50", "baseline-2view"]
    assert [rows[m]["passes_per_image"] for m in rows] == [1, 2, 1, 2]
    base = rows["baseline"]["images_per_s_rounds"]
    for method, same in (("backmix", "baseline-2view"), ("backmix-p50", "baseline")):
        r = rows[method]
        assert len(r["images_per_s_rounds"]) == 2 and r["images_per_s"] == statistics.median(r["images_per_s_rounds"])
        assert r["vs_baseline"] == statistics.median(a / b for a, b in zip(r["images_per_s_rounds"], base))
        want = statistics.median(a / b for a, b in zip(r["images_per_s_rounds"], rows[same]["images_per_s_rounds"]))
        assert r["vs_same_passes"] == want and 0 <= r["wait_share"] < 1
    assert rows["baseline"]["vs_baseline"] is None
    table = capsys.readouterr().out
    assert "| reference | backmix | 2 |" in table and report["command"].startswith("backmix bench train")


def test_bench_train_refuses_a_window_longer_than_an_epoch(tiny_root, capsys):
    # 24 images: 3 batches of 8 an epoch, fewer than 1 + 5 steps
    assert cli_main(["bench", "train", "--data", str(tiny_root), "--backend", "reference", "--methods", "baseline",
                     "--steps", "5", "--warmup", "1", "--rounds", "1", "--batch-size", "8", "--workers", "0",
                     "--device", "cpu"]) == 2
    assert "fewer than --warmup 1 + --steps 5" in capsys.readouterr().err
    assert cli_main(["bench", "train", "--data", str(tiny_root), "--methods", "mixup", "--device", "cpu"]) == 2
    assert "unknown method 'mixup'" in capsys.readouterr().err
