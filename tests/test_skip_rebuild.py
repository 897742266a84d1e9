"""``--on-error skip`` through a cache rebuild: a training image that does not decode is left out of
the rebuild too, keeping its previous map, instead of stopping the run at the first rebuild."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from backmix.cam_cache import ForegroundCache
from backmix.cli import main as cli_main
from backmix.osr_data import ImageIndex


@pytest.fixture()
def broken_run(small_root, tmp_path) -> tuple[list[str], Path, Path, int]:
    """CLI args of a 2-epoch run rebuilding the cache after epoch 1, on a copy of the small folder whose
    first training "ant" image does not decode (indexed as it is); the run folder, the file, its row."""
    root = tmp_path / "broken"
    shutil.copytree(small_root, root, ignore=shutil.ignore_patterns("index.csv"))
    victim = sorted((root / "train" / "ant").iterdir())[0]
    victim.write_bytes(b"not an image")
    index = ImageIndex.load(root / "train")
    row = next(i for i in range(len(index)) if Path(index.abspath(i)) == victim)
    run = tmp_path / "run"
    args = ["train", "--data", str(root), "--out", str(run), "--epochs", "2", "--width", "0.25",
            "--batch-size", "8", "--known", "ant,cat", "--workers", "0", "--device", "cpu",
            "--regen-every", "1", "--val-fraction", "0", "--no-progress"]
    return args, run, victim, row


@pytest.mark.parametrize("regen", ["loop", "pass"])
def test_skip_keeps_a_broken_rows_map_through_a_rebuild(broken_run, regen, caplog):
    args, run, victim, row = broken_run
    with caplog.at_level(logging.WARNING, logger="backmix"):
        assert cli_main(args + ["--regen", regen, "--on-error", "skip"]) == 0
    cache = ForegroundCache(run / "cache")
    assert cache.generation == 1
    maps = cache.gather(np.array([row]))
    assert (maps == 0.5).all()                            # generation 0's value: neither recomputed nor zeroed
    others = cache.gather(np.array([r for r in range(len(cache)) if r != row and cache.labels[r] == cache.labels[row]]))
    assert (others != 0.5).any()                          # the other rows of its class were rebuilt
    rebuild_lines = [r.getMessage() for r in caplog.records if "its map keeps its previous value" in r.getMessage()]
    assert rebuild_lines == [f"skipped {victim}: it does not decode (its map keeps its previous value)"]


def test_raise_still_stops_in_one_line(broken_run, capsys):
    args, run, victim, row = broken_run
    assert cli_main(args + ["--on-error", "raise"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("backmix: error: ") and err.count("\n") == 1 and "does not decode" in err
