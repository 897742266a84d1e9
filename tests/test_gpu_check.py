"""scripts/gpu-check.sh, end to end in its --cpu dry run: every step that needs no CUDA, at tiny sizes,
so the one command a rare GPU machine gets is known to work before it meets one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu-check.sh"


def run(*args, timeout=300):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], cwd="/", env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_dry_run_does_every_step_and_writes_the_reports(tmp_path):
    out = tmp_path / "out"
    r = run(out, "--cpu")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = (out / "summary.txt").read_text().splitlines()
    steps = [line.split(":")[0] for line in summary]
    assert steps == ["install", "cuda-tests", "bench-loader", "decode-difference", "bench-cache", "bench-train", "ddp-gloo",
                     "nccl"]
    assert all(": exit 0," in line for line in summary[:-1])
    assert summary[-1] == "nccl: skipped, no CUDA in the --cpu dry run (its script ran on gloo as ddp-gloo)"
    assert "skipped" in (out / "test-cuda.log").read_text()       # collected, skipped without CUDA

    reports = {name: json.loads((out / f"{name}-gpu.json").read_text())
               for name in ("loader", "decode", "cache", "ddp", "train")}
    for report in reports.values():
        assert report["dry_run"] is True and report["gpu"] is None and report["host"]
    loader = reports["loader"]
    assert loader["config"]["device"] == "cpu" and loader["config"]["augment"] == "rrc"
    rows = {(x["backend"], x["mode"]): x for x in loader["results"]}
    assert set(rows) == {(b, m) for b in ("reference", "torchvision") for m in ("off", "on", "on+clean")}
    assert all(row["images_per_s"] > 0 for row in rows.values())
    assert "torchvision_backmix_vs_reference_backmix" in loader["ratios"]
    # On the CPU the torchvision backend decodes as the reference loader does: not one level apart.
    decode = reports["decode"]["results"]
    assert [(d["canvas_mode"], d["images"], d["max_abs"]) for d in decode] == [("center", 16, 0), ("stretch", 16, 0)]
    # the NCCL step's script, on gloo: an all-reduce over the one rank, two DDP steps, generation 1 published
    ddp = reports["ddp"]
    assert (ddp["backend"], ddp["device"], ddp["world"], ddp["all_reduce"]) == ("gloo", "cpu", 1, [1.0] * 4)
    assert ddp["steps"] == 2 and ddp["published_generation"] == 1
    train = {(x["backend"], x["method"]): x for x in reports["train"]["results"]}
    assert set(train) == {(b, m) for b in ("reference", "torchvision")
                          for m in ("baseline", "baseline-2view", "backmix", "backmix-mixed", "backmix-p50")}
    assert all(x["images_per_s"] > 0 for x in train.values()) and reports["train"]["config"]["device"] == "cpu"
    regen = reports["cache"]["in_loop_vs_pass"]
    assert regen["device"] == "cpu" and regen["in_loop_vs_pass_ratio"] > 0 and reports["cache"]["precompute"]


def test_a_wrong_call_is_the_usage_line(tmp_path):
    for args in ((), (tmp_path / "out", "--gpu"), (tmp_path / "out", "--cpu", "more"), ("--cpu",)):
        r = run(*args, timeout=30)
        assert r.returncode == 2 and r.stderr.strip() == "usage: bash scripts/gpu-check.sh OUTDIR [--cpu]", args
    assert not (tmp_path / "out").exists()
