"""``backmix experiment`` on a user's folder: a split list from a file, --open-test sets scored in the
report, and each run under torchrun (--nproc-per-node)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backmix.cli import main as cli_main
from backmix.osr_data.prepare import write_split

from test_trainer import env   # the subprocess environment the trainer's tests run commands with


@pytest.fixture(scope="module")
def unknowns(tmp_path_factory) -> Path:
    """A folder of two classes the small root does not have, 6 images each."""
    rng = np.random.default_rng(5)
    root = tmp_path_factory.mktemp("others") / "far"
    write_split(root, rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8), np.repeat(np.arange(2), 6), ("elk", "fox"))
    return root


def experiment_words(out: Path, data: Path, *extra: str) -> list[str]:
    return ["-q", "experiment", "--out", str(out), "--data", str(data), "--methods", "baseline,backmix",
            "--epochs", "1", "--width", "0.25", "--device", "cpu", *extra]


def test_splits_from_a_file_and_open_test_sets_each_get_their_rows(small_root, unknowns, tmp_path, capsys):
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps([["ant", "bee"], ["cat", "dog", "ant"]]))
    assert cli_main(experiment_words(tmp_path / "exp", small_root, "--splits", str(splits),
                                     "--open-test", str(unknowns))) == 0
    lines = [json.loads(line) for line in (tmp_path / "exp" / "results.jsonl").read_text().splitlines()]
    assert sorted((r["split"], r["method"]) for r in lines) == [(0, "backmix"), (0, "baseline"),
                                                                (1, "backmix"), (1, "baseline")]
    assert {r["config"]["splits_file"] for r in lines} == {str(splits)}
    assert all(set(r["metrics"]["open_test"]) == {"far"} for r in lines)
    text = (tmp_path / "exp" / "results.md").read_text()
    ds = small_root.name
    base = {r["split"]: r["metrics"] for r in lines if r["method"] == "baseline"}
    mix = {r["split"]: r["metrics"] for r in lines if r["method"] == "backmix"}
    for name, of in ((ds, lambda m: m), (f"{ds} vs far", lambda m: m["open_test"]["far"])):
        row = next(line for line in text.split("Against the plain baseline")[1].splitlines()
                   if line.startswith(f"| {name} | backmix − baseline |"))
        d = np.array([of(mix[k])["auroc_mls"] - of(base[k])["auroc_mls"] for k in (0, 1)]) * 100
        assert row.split(" | ")[5].startswith(f"{d.mean():+.1f} ± {d.std(ddof=1):.1f}")
    capsys.readouterr()
    # another split list in the same folder is another experiment
    other = tmp_path / "other.json"
    other.write_text(json.dumps([["ant", "dog"]]))
    assert cli_main(experiment_words(tmp_path / "exp", small_root, "--splits", str(other))) == 2
    assert "holds runs of another budget (splits_file" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--splits", "6"], "--splits must lie in 1..5, got 6"),
    (["--splits", "nowhere.json"], "nowhere.json"),
    (["--protocol", "cifar10", "--splits", "x.json"], "--splits FILE names the splits of a --data folder"),
    (["--nproc-per-node", "0"], "--nproc-per-node must lie in 1..1024, got 0"),
])
def test_bad_experiment_options_are_one_line(small_root, tmp_path, capsys, extra, message):
    assert cli_main(experiment_words(tmp_path / "exp", small_root, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("backmix: error: ") and err.count("\n") == 1 and message in err


def test_each_run_under_torchrun_with_two_processes(small_root, tmp_path):
    cmd = [sys.executable, "-m", "backmix"] + experiment_words(tmp_path / "exp", small_root, "--splits", "1",
                                                               "--nproc-per-node", "2", "--methods", "baseline",
                                                               "--keep-runs")
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    (line,) = [json.loads(x) for x in (tmp_path / "exp" / "results.jsonl").read_text().splitlines()]
    run = tmp_path / "exp" / "runs" / small_root.name / "split0" / "seed0" / "baseline"
    summary = json.loads((run / "summary.json").read_text())
    assert line["metrics"] == summary["last"]["test"] and 0.0 <= line["metrics"]["accuracy"] <= 1.0
    assert line["nproc_per_node"] == 2 and (run / "asked.yaml").is_file()   # the config torchrun's ranks read
