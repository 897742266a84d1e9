"""``backmix bench peers``: the stock loaders it measures, its rounds and ratios, its report."""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from backmix.osr_data.normalize import IMAGENET_MEAN, IMAGENET_STD
from backmix.osr_data.index import ImageIndex

CPU = torch.device("cpu")


def assert_normalised_crops(batch, size: int, crop: int, classes: int) -> None:
    """images: float32 [size, 3, crop, crop], ImageNet-normalised 8-bit pixels; labels: int64 class ids."""
    images, labels = batch
    assert images.shape == (size, 3, crop, crop) and images.dtype == torch.float32
    assert labels.shape == (size,) and labels.dtype == torch.int64
    assert 0 <= int(labels.min()) and int(labels.max()) < classes
    levels = (images * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) * 255
    assert float(levels.min()) > -0.01 and float(levels.max()) < 255.01
    assert torch.allclose(levels, levels.round(), atol=0.01)   # each a uint8 level, normalised
    assert float(levels.std()) > 20                             # the random pixels, not a fill


def one_epoch(loader) -> list:
    loader.set_epoch(0)
    return list(loader)


def test_stock_torch_loader_yields_normalised_crops(tiny_root):
    from backmix.bench.peer_loaders import torch_stock
    batches = one_epoch(torch_stock(tiny_root, batch_size=8, workers=0, crop=32, device=CPU))
    assert len(batches) == 3        # 24 images, full batches only
    for batch in batches:
        assert_normalised_crops(batch, 8, 32, 3)


def test_stock_dali_loader_yields_normalised_crops(tiny_root):
    from backmix.bench.peer_loaders import dali_stock
    batches = one_epoch(dali_stock(tiny_root, batch_size=8, workers=1, crop=32, device=CPU))
    assert len(batches) == 3        # 24 images, full batches only
    for batch in batches:
        assert_normalised_crops(batch, 8, 32, 3)


def test_stock_ffcv_beton_is_written_once_by_ffcv_and_read_by_its_recipe(tiny_root, tmp_path):
    from ffcv.reader import Reader

    from backmix.bench.peer_loaders import ffcv_stock, write_stock_beton
    folder = tmp_path / "train"
    shutil.copytree(tiny_root, folder)
    beton = write_stock_beton(ImageIndex.load(folder), jpeg_quality=90, workers=1)
    assert beton.parent == tmp_path / ".backmix-betons" and beton.name.startswith("stock-")
    assert set(Reader(str(beton)).handlers) == {"image", "label"}     # FFCV's ImageNet fields, no more
    written = beton.stat().st_mtime_ns
    assert write_stock_beton(ImageIndex.load(folder), jpeg_quality=90, workers=1) == beton
    assert beton.stat().st_mtime_ns == written                        # found, not rewritten
    batches = one_epoch(ffcv_stock(beton, batch_size=8, workers=1, crop=32, device=CPU))
    assert len(batches) == 3
    for batch in batches:
        assert_normalised_crops(batch, 8, 32, 3)


def peers(argv: list[str], capsys) -> tuple[int, str, str]:
    from backmix.cli import main
    capsys.readouterr()
    status = main(["bench", "peers", *argv])
    out, err = capsys.readouterr()
    return status, out, err


TINY = ["--batch-size", "8", "--canvas", "40", "--crop", "32", "--workers", "1", "--device", "cpu"]


def test_peers_command_measures_in_fresh_processes_and_skips_missing_libraries(tiny_root, tmp_path, capsys,
                                                                               monkeypatch):
    from backmix.bench import peers as bench_peers

    # FFCV and DALI as if not installed: the families are one line each, and the torch one still runs.
    for name in ("ffcv", "nvidia.dali"):
        monkeypatch.setitem(sys.modules, name, None)
    # Three of the torch family's seven configurations, each a child process: what the others add is time.
    measured = ("torch stock", "reference on+clean", "torchvision on")
    every = bench_peers.peers_of
    monkeypatch.setattr(bench_peers, "peers_of", lambda *a: [p for p in every(*a) if p.name in measured])
    status, out, err = peers(["--data", str(tiny_root), "--rounds", "1", "--batches", "1", "--warmup", "1", *TINY,
                              "--out", str(tmp_path / "out")], capsys)
    assert status == 0, err
    assert out.count("skipped: FFCV not installed") == 1 and out.count("skipped: DALI not installed") == 1
    assert "Traceback" not in out + err
    report = json.loads((tmp_path / "out" / "peers.json").read_text())
    assert {"command", "machine", "versions", "data", "images", "formats", "config", "rounds", "families", "skipped",
            "betons", "results", "round_records"} <= set(report)
    assert report["families"] == ["torch"] and set(report["skipped"]) == {"ffcv", "dali"}
    assert report["formats"] == {"PNG": 24} and report["images"] == 24 and report["machine"]["cores"] >= 1
    assert "torch" in report["versions"] and report["config"]["augment"] == "rrc"
    rows = {r["name"]: r for r in report["results"]}
    assert tuple(rows) == measured
    stock = rows["torch stock"]["images_per_s_rounds"][0]
    for name, row in rows.items():
        assert row["images_per_s"] > 0 and "error" not in row
        if name != "torch stock":
            assert row["ratio_to_stock_rounds"] == [row["images_per_s_rounds"][0] / stock]
            assert f"| torch | backmix {name.split()[0]} | {row['mode']} |" in out
    assert "one round only" in out and "load (1 min)" in out
    assert Image.open(tmp_path / "out" / "peers.png").format == "PNG"
    assert sum(line.startswith("round 1/1, ") for line in err.splitlines()) == 3   # a progress line each


def test_peers_ratios_and_medians_come_from_the_interleaved_rounds(tiny_root, tmp_path, capsys, monkeypatch):
    from backmix.bench import peers as bench_peers

    calls = []

    def fake_measure(peer, setup, timeout):
        calls.append(peer.name)
        r = calls.count(peer.name)                  # this peer's round, 1..3
        if peer.name == "dali on" and r == 2:
            return {"error": "it broke"}
        base = {"torch": 100.0, "ffcv": 400.0, "dali": 200.0}[peer.family]
        rate = base * r if peer.loader == "stock" else base * (1 + len(calls) % 7) / 3
        return {"images_per_s": rate, "batch_ms_median": 8e3 / rate, "batches": 1}

    monkeypatch.setattr(bench_peers, "measure", fake_measure)
    monkeypatch.setattr(bench_peers, "missing_library", lambda family: None)
    monkeypatch.setattr(bench_peers, "prepare_betons", lambda *a: {
        name: {"path": f"/x/{name}.beton", "bytes": 2e6, "what": name} for name in ("stock", "jpg90", "raw")})
    status, out, err = peers(["--data", str(tiny_root), "--rounds", "3", *TINY, "--json", str(tmp_path / "p.json"),
                              "--plot", str(tmp_path / "p.png")], capsys)
    assert status == 0, err
    report = json.loads((tmp_path / "p.json").read_text())
    names = [r["name"] for r in report["results"]]
    assert len(names) == 7 + 7 + 4 and "ffcv jpg90 on" in names and "ffcv raw on+clean" in names
    for r, record in enumerate(report["round_records"]):
        assert record["order"] == names[r:] + names[:r]          # every peer once, rotated by one a round
    assert calls == [n for record in report["round_records"] for n in record["order"]]
    for row in report["results"]:
        stock = next(s for s in report["results"] if s["name"] == f"{row['family']} stock")
        rates = row["images_per_s_rounds"]
        assert row["images_per_s"] == statistics.median([v for v in rates if v is not None])
        if row["loader"] == "stock":
            assert "ratio_to_stock" not in row
            continue
        expected = [None if v is None else v / s for v, s in zip(rates, stock["images_per_s_rounds"])]
        assert row["ratio_to_stock_rounds"] == expected
        assert row["ratio_to_stock"] == statistics.median([v for v in expected if v is not None])
    broken = next(r for r in report["results"] if r["name"] == "dali on")
    assert broken["images_per_s_rounds"][1] is None and broken["error"] == "it broke"
    assert "failed: dali on: it broke" in out and "one round only" not in out
    assert "stock (stock) 2.0 MB" in out and "raw (raw) 2.0 MB" in out


@pytest.mark.parametrize("argv, says", [
    (["--families", "torch,keras"], "--families takes a comma list of torch, ffcv, dali"),
    (["--rounds", "0"], "--rounds must be >= 1"),
    (["--jpeg-quality", "101"], "--jpeg-quality must lie in 1..100"),
    (["--crop", "300"], "crop"),
    (["--timeout", "nan"], "--timeout must be >= 1, got nan"),
    (["--plot", "PLACE/r.out"], "a figure cannot be written as .out"),
    (["--json", "PLACE/r.png", "--plot", "PLACE/r.png"], "--json and --plot both name"),
])
def test_peers_refuses_bad_input_in_one_line(tiny_root, tmp_path, capsys, argv, says):
    argv = [word.replace("PLACE", str(tmp_path)) for word in argv]
    status, out, err = peers(["--data", str(tiny_root), "--out", str(tmp_path), *TINY, *argv], capsys)
    assert status == 2 and err.count("\n") == 1 and err.startswith("backmix: error: ") and says in err
    assert not (tmp_path / "peers.json").exists() and not (tmp_path / "r.png").exists()


def test_the_dali_profile_script_says_its_usage_and_refuses_what_it_lacks_in_one_line(tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "profile-dali.sh"
    bash = shutil.which("bash")

    def run(*args, path=None):
        env = {**os.environ, **({"PATH": str(path)} if path else {})}
        return subprocess.run([bash, str(script), *args], capture_output=True, text=True, env=env)

    r = run("--help")
    assert r.returncode == 0 and r.stdout.startswith("Where the DALI loader's CPU time goes")
    assert "bash scripts/profile-dali.sh OUT [DATA]" in r.stdout
    r = run()
    assert r.returncode == 2 and "bash scripts/profile-dali.sh OUT [DATA]" in r.stderr
    no_perf = tmp_path / "bin-without-perf"
    no_perf.mkdir()
    r = run(str(tmp_path / "out"), path=no_perf)
    assert r.returncode == 2 and r.stderr == "profile-dali: perf is not installed (linux-tools)\n"
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "perf").write_text("#!/bin/sh\n")
    (stub / "perf").chmod(0o755)
    r = run(str(tmp_path / "out"), str(tmp_path / "nowhere"), path=f"{stub}:{os.environ['PATH']}")
    assert r.returncode == 2 and r.stderr == (f"profile-dali: no image folder at {tmp_path / 'nowhere'} "
                                              "(run 'backmix bench peers' once to make it)\n")
    assert not (tmp_path / "out").exists()
