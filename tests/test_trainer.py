"""The trainer: cache regeneration schedule, DDP on gloo, kill-and-resume, bad inputs.

Everything runs on a small random data set (4 classes, 2 known) with a width-0.25
cnn32 so that the whole file stays well under a minute or two on 2 CPU cores.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from backmix.cli import main as cli_main
from backmix.osr_data.errors import BackMixError
from backmix.osr_data.prepare import write_split
from backmix.trainers.config import TrainConfig
from backmix.trainers.train import main

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("ant", "bee", "cat", "dog")


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    """root/train (12 a class) and root/test (6 a class) of random 32x32 RGB images, 4 classes."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("small")
    for split, per_class in (("train", 12), ("test", 6)):
        labels = np.repeat(np.arange(4), per_class)
        images = rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8)
        images[..., labels % 3] //= 2   # a little class signal, so training has something to learn
        write_split(root / split, images, labels, CLASSES)
    return root


def tiny(root: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(root), out=str(out), epochs=2, width=0.25, batch_size=8, lr=0.05, split="ant,cat",
                workers=0, device="cpu", progress=False, regen_every=1)
    return TrainConfig(**{**base, **kw})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def cli_args(cfg: TrainConfig) -> list[str]:
    return ["train", "--data", cfg.data, "--out", cfg.out, "--epochs", str(cfg.epochs), "--width", str(cfg.width),
            "--batch-size", str(cfg.batch_size), "--lr", str(cfg.lr), "--known", cfg.split, "--workers", "0",
            "--device", "cpu", "--regen-every", str(cfg.regen_every), "--no-progress"]


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [e.get("PYTHONPATH")] if p])
    e["OMP_NUM_THREADS"] = "1"
    return e


@pytest.fixture(scope="module")
def finished_run(small_root, tmp_path_factory) -> TrainConfig:
    """A 4-epoch BackMix run with a cache rebuild after every 2nd epoch."""
    cfg = tiny(small_root, tmp_path_factory.mktemp("runs") / "regen", epochs=4, regen_every=2)
    main(cfg)
    return cfg


def test_regeneration_happens_on_schedule_and_feeds_the_next_epoch(finished_run):
    from backmix.cam_cache import ForegroundCache

    run = Path(finished_run.out)
    lines = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4]
    # rebuilt after epoch 2 only (never after the last epoch: nothing would use it)
    assert [r.get("regenerated") for r in lines] == [None, 1, None, None]
    assert all(r["regen_s"] > 0 for r in lines if "regenerated" in r)
    # the loader's maps: generation 0 for epochs 1-2, the rebuilt generation 1 from epoch 3
    assert [r["cache_generation"] for r in lines] == [0, 0, 1, 1]
    assert ForegroundCache(run / "cache").generation == 1
    for name in ("config.json", "last.pt", "best.pt"):
        assert (run / name).is_file()
    final = lines[-1]["eval"]
    assert final["num_known"] == 12 and final["num_unknown"] == 12
    assert 0.0 <= final["oscr_msp"] <= final["accuracy"] <= 1.0
    ckpt = torch.load(run / "last.pt", weights_only=False)
    assert ckpt["epoch"] == 4 and ckpt["known_classes"] == ["ant", "cat"] and ckpt["arch"] == "cnn32"


def test_eval_command_prints_the_run_metrics(finished_run, capsys):
    run = Path(finished_run.out)
    assert cli_main(["eval", "--checkpoint", str(run / "last.pt"), "--data", finished_run.data,
                     "--workers", "0", "--device", "cpu", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    final = read_jsonl(run / "metrics.jsonl")[-1]["eval"]
    assert printed == pytest.approx(final)


def test_baseline_trains_without_a_cache(small_root, tmp_path):
    cfg = tiny(small_root, tmp_path / "base", epochs=1, backmix=False)
    metrics = main(cfg)
    assert not (tmp_path / "base" / "cache").exists()
    line = read_jsonl(tmp_path / "base" / "metrics.jsonl")[0]
    assert line["cache_generation"] is None and "regenerated" not in line
    assert metrics == line["eval"]


def test_w_raw_0_trains_on_the_mixed_crops_alone(small_root, tmp_path, monkeypatch):
    """The authors' recipe: the loader skips the clean crops and the model sees the mixed ones only."""
    import backmix.trainers.train as train_mod
    cfg = tiny(small_root, tmp_path / "mixed-only", epochs=1, w_raw=0.0)
    assert train_mod.loader_config(cfg, torch.device("cpu"), train=True).clean is False
    assert train_mod.loader_config(cfg, torch.device("cpu"), train=False).clean      # evaluation: clean
    seen = []
    build = train_mod.build_model

    def recording_model(*args, **kw):
        model = build(*args, **kw)
        model.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].shape[0]) if m.training else None)
        return model

    monkeypatch.setattr(train_mod, "build_model", recording_model)
    main(cfg)
    assert seen and all(n <= cfg.batch_size for n in seen)     # one crop per image, not clean + mixed
    seen.clear()
    main(tiny(small_root, tmp_path / "both", epochs=1))
    assert max(seen) == 2 * cfg.batch_size
    for bad in (dict(w_raw=0.0, backmix=False), dict(w_raw=0.0, w_mix=0.0), dict(w_mix=-1.0)):
        with pytest.raises(BackMixError, match="--w-"):
            tiny(small_root, tmp_path / "bad", **bad)


def test_resume_of_a_finished_run_is_refused(finished_run, capsys):
    assert cli_main(cli_args(finished_run) + ["--epochs", "4", "--resume"]) == 2
    assert "has finished all 4 epochs" in capsys.readouterr().err


def test_checkpoint_of_another_arch_or_class_count_is_refused(finished_run):
    with pytest.raises(BackMixError, match="holds a cnn32 model, not resnet18"):
        main(TrainConfig(**{**finished_run.to_dict(), "epochs": 4, "arch": "resnet18"}), resume=True,
             explicit={"arch"})
    with pytest.raises(BackMixError, match="has 2 classes, the data has 3"):
        main(TrainConfig(**{**finished_run.to_dict(), "split": "ant,bee,cat"}), resume=True, explicit={"split"})
    with pytest.raises(BackMixError, match="has 2 classes, the data has 3"):
        from backmix.trainers.train import evaluate_checkpoint
        evaluate_checkpoint(Path(finished_run.out) / "last.pt", finished_run.data, split="ant,bee,cat",
                            device="cpu", workers=0)


def test_a_second_run_into_the_same_folder_is_refused(finished_run):
    with pytest.raises(BackMixError, match="already holds a run; pass --resume"):
        main(finished_run)


def test_world_size_not_matching_a_pending_cache_build_is_reported(small_root, tmp_path):
    from backmix.cam_cache import build_generation, init_cache
    from backmix.cam_cache.models import build_model
    from backmix.osr_data.index import ImageIndex
    from backmix.trainers.train import load_data

    cache = tmp_path / "shared-cache"
    data = load_data(small_root, "ant,cat")
    init_cache(cache, ImageIndex.load(small_root / "train"), grid=8)
    model = build_model("cnn32", 2, width=0.25)
    # shard 0 of a 3-rank build of the next generation, never finished
    build_generation(cache, model, data.train, canvas=40, mean=(0.5,) * 3, std=(0.25,) * 3,
                     label_map=data.label_map, rows=data.known_rows, num_workers=0, device="cpu",
                     shard=(0, 3), publish=False, progress=False)
    cfg = tiny(small_root, tmp_path / "run", epochs=2, regen_every=1, cache=str(cache))
    with pytest.raises(BackMixError, match=r"cache rebuild in .* failed on rank 0: .*"):
        main(cfg)


def test_killed_run_resumes_to_the_same_result(small_root, tmp_path):
    """SIGKILL once the first epoch's checkpoint is on disk, resume: same weights and metrics as unbroken."""
    cfg = tiny(small_root, tmp_path / "killed", epochs=3, regen_every=1)
    proc = subprocess.Popen([sys.executable, "-m", "backmix", "-q", *cli_args(cfg)], cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = Path(cfg.out) / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert last.exists(), proc.stderr.read().decode() if proc.poll() is not None else "no checkpoint in time"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert torch.load(last, weights_only=False)["epoch"] < 3   # it really was cut short
    done = subprocess.run([sys.executable, "-m", "backmix", "-q", *cli_args(cfg), "--resume"], cwd=REPO,
                          env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    straight = tiny(small_root, tmp_path / "straight", epochs=3, regen_every=1)
    subprocess.run([sys.executable, "-m", "backmix", "-q", *cli_args(straight)], cwd=REPO, env=env(),
                   check=True, capture_output=True, timeout=300)
    a, b = read_jsonl(Path(cfg.out) / "metrics.jsonl"), read_jsonl(Path(straight.out) / "metrics.jsonl")
    assert [r["epoch"] for r in a] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for key in ("loss", "train_acc", "cache_generation", "eval"):
            assert ra[key] == rb[key], (ra["epoch"], key)
    wa = torch.load(Path(cfg.out) / "last.pt", weights_only=False)["state_dict"]
    wb = torch.load(Path(straight.out) / "last.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_run_keeps_ranks_identical_and_evaluates(small_root, tmp_path):
    cfg = tiny(small_root, tmp_path / "ddp", epochs=2, regen_every=1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "backmix", "-q", *cli_args(cfg)]
    done = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = read_jsonl(Path(cfg.out) / "metrics.jsonl")
    assert [r["epoch"] for r in lines] == [1, 2]          # rank 0 alone writes the run files
    assert lines[0]["regenerated"] == 1 and lines[1]["cache_generation"] == 1   # one shared cache build
    digests = lines[-1]["weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    # each rank trains on its half: 24 known images, batch 8, drop -> one batch of 8 per rank
    assert lines[0]["images"] == 16
    assert "accuracy" in lines[-1]["eval"] and "AUROC (MSP)" in done.stdout


def test_resume_redoes_a_cache_rebuild_cut_short_by_a_kill(small_root, tmp_path, monkeypatch):
    """Killed after epoch 1's checkpoint but before its cache rebuild: --resume rebuilds from those weights."""
    import backmix.trainers.train as train_mod

    real = train_mod.regenerate

    def killed(*args, **kwargs):
        raise KeyboardInterrupt   # stands in for SIGKILL at the start of the rebuild

    cfg = tiny(small_root, tmp_path / "cut", epochs=2, regen_every=1)
    monkeypatch.setattr(train_mod, "regenerate", killed)
    with pytest.raises(KeyboardInterrupt):
        main(cfg)
    assert torch.load(Path(cfg.out) / "last.pt", weights_only=False)["regen_pending"]
    monkeypatch.setattr(train_mod, "regenerate", real)
    main(cfg, resume=True)
    straight = tiny(small_root, tmp_path / "whole", epochs=2, regen_every=1)
    main(straight)
    a, b = read_jsonl(Path(cfg.out) / "metrics.jsonl"), read_jsonl(Path(straight.out) / "metrics.jsonl")
    assert [r["regenerated"] for r in a if "regenerated" in r] == [1]
    assert [r["cache_generation"] for r in a] == [r["cache_generation"] for r in b] == [0, 1]
    assert a[-1]["eval"] == b[-1]["eval"] and a[-1]["loss"] == b[-1]["loss"]


def test_experiment_pairs_methods_per_split_and_seed(tmp_path, capsys):
    from backmix.trainers.experiment import run_experiment
    overrides = {"epochs": 1, "width": 0.25, "device": "cpu", "batch_size": 128}
    results = run_experiment(tmp_path, ["digits"], 1, overrides, seeds=2, methods=("baseline", "backmix-mixed"))
    assert [(r["dataset"], r["split"], r["seed"], r["method"]) for r in results] == [
        ("digits", 0, 0, "baseline"), ("digits", 0, 0, "backmix-mixed"),
        ("digits", 0, 1, "baseline"), ("digits", 0, 1, "backmix-mixed")]
    assert [r["config"]["seed"] for r in results] == [0, 0, 1, 1]
    mixed = results[1]["config"]
    assert mixed["backmix"] is True and mixed["w_raw"] == 0.0 and results[0]["config"]["backmix"] is False
    assert results[0]["metrics"] != results[2]["metrics"]          # the seeds really train differently

    # The paired table leads results.md: mean ± std over the 2 pairs of (backmix-mixed - baseline).
    text = (tmp_path / "results.md").read_text()
    assert text.index("| dataset | variant − baseline |") < text.index("| dataset | method | runs |")
    cells = []
    for key in ("accuracy", "auroc_msp", "auroc_mls", "oscr_msp", "oscr_mls"):
        d = np.array([results[i + 1]["metrics"][key] - results[i]["metrics"][key] for i in (0, 2)]) * 100
        cells.append(f"{d.mean():+.1f} ± {d.std(ddof=1):.1f} ({int((d > 0).sum())}/2)")
    assert "| digits | backmix-mixed | 2 | " + " | ".join(cells) + " |" in text
    pair0 = [(results[1]["metrics"][k] - results[0]["metrics"][k]) * 100 for k in ("accuracy", "auroc_msp")]
    assert f"| digits | backmix-mixed | 0 | 0 | {pair0[0]:+.1f} | {pair0[1]:+.1f} |" in text
    assert "| digits | baseline | 2 |" in text and "| digits | backmix-mixed | 2 |" in text

    # The command again, through the CLI: finished runs are skipped, the table is printed again.
    capsys.readouterr()
    args = ["-q", "experiment", "--out", str(tmp_path), "--datasets", "digits", "--splits", "1", "--seeds", "2",
            "--budget", "quick", "--epochs", "1", "--width", "0.25", "--device", "cpu",
            "--methods", "backmix-mixed"]
    assert cli_main(args) == 2            # the CLI's batch size (64) differs from the runs' (128)
    assert "holds runs of another budget (batch_size 128 there, 64 asked)" in capsys.readouterr().err
    again = run_experiment(tmp_path, ["digits"], 1, overrides, seeds=2, methods=("backmix-mixed",))
    assert again == results and len((tmp_path / "results.jsonl").read_text().splitlines()) == 4
    assert capsys.readouterr().out == text
    with pytest.raises(BackMixError, match="unknown method 'mixup'"):
        run_experiment(tmp_path, ["digits"], 1, overrides, methods=("mixup",))
    with pytest.raises(BackMixError, match="--seeds must be at least 1"):
        run_experiment(tmp_path, ["digits"], 1, overrides, seeds=0)
