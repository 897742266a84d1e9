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
from backmix.osr_data.split_folder import write_split
from backmix.trainers.config import TrainConfig
from backmix.trainers.train import main

REPO = Path(__file__).resolve().parents[1]


def tiny(root: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(root), out=str(out), epochs=2, width=0.25, batch_size=8, lr=0.05, split="ant,cat",
                workers=0, device="cpu", progress=False, regen_every=1)
    return TrainConfig(**{**base, **kw})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def cli_args(cfg: TrainConfig) -> list[str]:
    return ["train", "--data", cfg.data, "--out", cfg.out, "--epochs", str(cfg.epochs), "--width", str(cfg.width),
            "--batch-size", str(cfg.batch_size), "--lr", str(cfg.lr), "--known", cfg.split, "--workers", "0",
            "--device", "cpu", "--regen-every", str(cfg.regen_every), "--val-fraction", str(cfg.val_fraction),
            "--no-progress"]


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


def test_validation_rows_are_never_trained_on_and_select_best_pt(finished_run, capsys):
    from backmix.cam_cache import ForegroundCache
    from backmix.osr_data.open_set import load_data

    run = Path(finished_run.out)
    lines = read_jsonl(run / "metrics.jsonl")
    data = load_data(finished_run.data, finished_run.split, 0.1, finished_run.seed)
    assert len(data.val_rows) == 2 and len(data.known_rows) == 22       # 1 of each known class's 12
    assert all(r["images"] == 22 and r["val"]["images"] == 2 for r in lines)
    # the rebuilt cache generation holds maps for the training rows only, not the validation rows
    maps = ForegroundCache(run / "cache").gather(np.arange(48))
    assert (maps[data.val_rows] == 0.5).all()                    # generation 0's value, never rebuilt
    assert all((maps[i] != 0.5).any() for i in data.known_rows)
    best = max(lines, key=lambda r: (r["val"]["accuracy"], -r["epoch"]))
    assert torch.load(run / "best.pt", weights_only=False)["epoch"] == best["epoch"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["last"]["epoch"] == 4 and summary["last"]["test"] == lines[-1]["eval"]
    assert summary["best"]["epoch"] == best["epoch"] and summary["best"]["val"] == best["val"]
    assert summary["best"]["selected_by"] == "validation closed-set accuracy"


def test_selection_reads_the_validation_rows_never_the_test_folder(small_root, tmp_path, monkeypatch, capsys):
    """The test folder is gone until the first test evaluation, after the last epoch; and a test accuracy
    that would pick another epoch does not move best.pt."""
    import shutil

    import backmix.trainers.train as train_mod
    root = tmp_path / "data"
    shutil.copytree(small_root, root)
    hidden = tmp_path / "hidden-test"
    val_acc = iter([0.25, 0.75, 0.5])          # validation picks epoch 2
    test_acc = iter([1.0, 0.0])                # what selection on the test folder would have picked: epoch 3 / 1
    validate, evaluate = train_mod.validation_metrics, train_mod.evaluate
    calls = []

    def fake_validation(*args):
        return {**validate(*args), "accuracy": next(val_acc)}

    def test_evaluation(*args, **kw):
        calls.append("test")
        if hidden.exists():
            shutil.move(hidden, root / "test")
        return {**evaluate(*args, **kw), "accuracy": next(test_acc)}

    real_epoch = train_mod.train_one_epoch

    def train_without_test_folder(*args, **kw):
        if (root / "test").exists():
            shutil.move(root / "test", hidden)
        return real_epoch(*args, **kw)

    monkeypatch.setattr(train_mod, "validation_metrics", fake_validation)
    monkeypatch.setattr(train_mod, "evaluate", test_evaluation)
    monkeypatch.setattr(train_mod, "train_one_epoch", train_without_test_folder)
    cfg = tiny(root, tmp_path / "run", epochs=3, eval_every=0, backmix=False)
    metrics = main(cfg)
    assert calls == ["test", "test"]            # after training: last.pt (epoch 3), then best.pt (epoch 2)
    assert torch.load(Path(cfg.out) / "best.pt", weights_only=False)["epoch"] == 2
    summary = json.loads((Path(cfg.out) / "summary.json").read_text())
    assert (summary["last"]["epoch"], summary["best"]["epoch"]) == (3, 2)
    assert summary["last"]["test"]["accuracy"] == metrics["accuracy"] == 1.0
    assert summary["best"]["test"]["accuracy"] == 0.0 and summary["best"]["val"]["accuracy"] == 0.75
    out = capsys.readouterr().out
    assert "last.pt (epoch 3, val acc 0.5000): test accuracy 1.0000" in out
    assert "best.pt (epoch 2, val acc 0.7500): test accuracy 0.0000" in out


def test_without_validation_rows_best_pt_is_the_last_epoch(small_root, tmp_path):
    cfg = tiny(small_root, tmp_path / "noval", epochs=2, backmix=False, val_fraction=0.0)
    main(cfg)
    lines = read_jsonl(Path(cfg.out) / "metrics.jsonl")
    assert all("val" not in r and r["images"] == 24 for r in lines)
    assert torch.load(Path(cfg.out) / "best.pt", weights_only=False)["epoch"] == 2
    assert json.loads((Path(cfg.out) / "summary.json").read_text())["best"]["selected_by"].startswith("none")


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


def record_training_forwards(monkeypatch) -> list[int]:
    """The batch size of every training forward pass of the runs that follow (a forward hook on each model
    the trainer builds)."""
    import backmix.trainers.train as train_mod
    seen, build = [], train_mod.build_model

    def recording_model(*args, **kw):
        model = build(*args, **kw)
        model.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].shape[0]) if m.training else None)
        return model

    monkeypatch.setattr(train_mod, "build_model", recording_model)
    return seen


def test_w_raw_0_trains_on_the_mixed_crops_alone(small_root, tmp_path, monkeypatch):
    """The authors' recipe: the loader skips the clean crops and the model sees the mixed ones only."""
    from backmix.trainers.run_data import loader_config
    cfg = tiny(small_root, tmp_path / "mixed-only", epochs=1, w_raw=0.0)
    assert loader_config(cfg, torch.device("cpu"), train=True).clean is False
    assert loader_config(cfg, torch.device("cpu"), train=False).clean      # evaluation: clean
    seen = record_training_forwards(monkeypatch)
    main(cfg)
    assert seen and all(n <= cfg.batch_size for n in seen)     # one crop per image, not clean + mixed
    seen.clear()
    main(tiny(small_root, tmp_path / "both", epochs=1))
    assert max(seen) == 2 * cfg.batch_size
    for bad in (dict(w_raw=0.0, backmix=False), dict(w_raw=0.0, w_mix=0.0), dict(w_mix=-1.0)):
        with pytest.raises(BackMixError, match="--w-"):
            tiny(small_root, tmp_path / "bad", **bad)


def forwarded_images(monkeypatch, cfg: TrainConfig) -> int:
    """Images the model sees in training forward passes over one run."""
    seen = record_training_forwards(monkeypatch)
    main(cfg)
    return sum(seen)


@pytest.mark.parametrize("method, passes", [("baseline", 1), ("baseline-2view", 2), ("backmix", 2),
                                            ("backmix-mixed", 1), ("backmix-p50", 1)])
def test_each_method_makes_its_forward_passes(small_root, tmp_path, monkeypatch, method, passes):
    """baseline-2view costs what BackMix's clean + mixed costs: two forward passes per training image."""
    from backmix.trainers.methods import METHODS
    cfg = tiny(small_root, tmp_path / method, epochs=1, **METHODS[method])
    assert cfg.forward_passes == passes
    n = forwarded_images(monkeypatch, cfg)
    assert n == passes * read_jsonl(Path(cfg.out) / "metrics.jsonl")[0]["images"]


def test_method_presets_refuse_a_contradicting_flag(small_root, tmp_path, capsys):
    base = ["train", "--data", str(small_root), "--out", str(tmp_path / "x"), "--known", "ant,cat"]
    assert cli_main(base + ["--method", "backmix-p50", "--no-backmix"]) == 2
    assert "--method backmix-p50 sets --no-backmix itself" in capsys.readouterr().err
    assert cli_main(base + ["--mix-prob", "0.5", "--no-backmix"]) == 2
    assert "--mix-prob" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_resume_of_a_finished_run_is_refused(finished_run, capsys):
    assert cli_main(cli_args(finished_run) + ["--epochs", "4", "--resume"]) == 2
    assert "has finished all 4 epochs" in capsys.readouterr().err


@pytest.mark.parametrize("field, value, old", [("arch", "resnet18", "'cnn32'"), ("width", 1.0, "0.25"),
                                               ("split", "ant,bee,cat", "'ant,cat'")])
def test_resume_refuses_a_field_that_shapes_the_model(finished_run, field, value, old, capsys):
    run = Path(finished_run.out)
    before = {name: (run / name).read_bytes() for name in ("config.json", "last.pt", "best.pt")}
    with pytest.raises(BackMixError, match=rf"--resume cannot change --{field} of the run in .*: "
                                           rf"it was {old}, not {value!r}"):
        main(TrainConfig(**{**finished_run.to_dict(), "epochs": 5, field: value}), resume=True, explicit={field})
    assert {name: (run / name).read_bytes() for name in before} == before    # nothing rewritten


def test_resume_refuses_another_data_set(finished_run, small_root, tmp_path, capsys):
    """The same class folders, other images: a moved copy is accepted, a different data set is not."""
    import shutil
    moved, other = tmp_path / "moved", tmp_path / "other"
    shutil.copytree(small_root, moved)
    shutil.copytree(small_root, other)
    victim = next((other / "train" / "ant").iterdir())
    victim.unlink()
    from backmix.osr_data.index import ImageIndex
    ImageIndex.scan(other / "train").write()
    args = [a for a in cli_args(finished_run) if a != finished_run.data]
    at = args.index("--data") + 1
    assert cli_main(args[:at] + [str(other)] + args[at:] + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--resume cannot change --data of the run in {finished_run.out}" in err
    assert str(other) in err and finished_run.data in err
    # the moved copy passes that check (and then finds the run finished)
    assert cli_main(args[:at] + [str(moved)] + args[at:] + ["--resume"]) == 2
    assert "has finished all 4 epochs" in capsys.readouterr().err


def test_a_checkpoint_of_another_class_count_is_refused(finished_run):
    from backmix.models import load_model
    with pytest.raises(BackMixError, match="has 2 classes, the data has 3"):
        load_model(Path(finished_run.out) / "last.pt", num_classes=3)
    # eval --split with other classes than the checkpoint's says that first (test_hostile_input.py)


def test_a_second_run_into_the_same_folder_is_refused(finished_run):
    with pytest.raises(BackMixError, match="already holds a run; pass --resume"):
        main(finished_run)


def test_an_out_inside_an_image_folder_of_the_run_is_refused_before_it_is_made(small_root, tmp_path):
    with pytest.raises(BackMixError, match=f"--out {small_root / 'train' / 'run'} is inside the data folder "
                                           f"{small_root / 'train'}"):
        main(tiny(small_root, small_root / "train" / "run", epochs=1))
    assert not (small_root / "train" / "run").exists()


def test_world_size_not_matching_a_pending_cache_build_is_reported(small_root, tmp_path):
    from backmix.cam_cache import build_generation, init_cache
    from backmix.models import build_model
    from backmix.osr_data.index import ImageIndex
    from backmix.osr_data.open_set import load_data

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


def stop_when(proc: subprocess.Popen, last: Path, ready) -> dict:
    """Poll ``last`` until ``ready(checkpoint)``; the process is stopped (SIGSTOP) while each look is
    taken, so the checkpoint found is the one it holds when it is killed. Returns that checkpoint."""
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        proc.send_signal(signal.SIGSTOP)
        ckpt = torch.load(last, weights_only=False) if last.exists() else None
        if ckpt is not None and ready(ckpt):
            return ckpt
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.01)
    pytest.fail(proc.stderr.read().decode() if proc.poll() is not None else "no such checkpoint in time")


@pytest.mark.parametrize("save_every, method", [(0, None), (1, None), (1, "baseline-2view"), (1, "backmix-p50")],
                         ids=["epoch-end", "mid-epoch", "mid-epoch-2view", "mid-epoch-mix-prob"])
def test_killed_run_resumes_to_the_same_result(small_root, tmp_path, save_every, method):
    """SIGKILL once a checkpoint is on disk (after epoch 1, or part-way through an epoch with --save-every),
    resume: the same weights and metrics as the unbroken run, bit for bit."""
    cfg = tiny(small_root, tmp_path / "killed", epochs=3, regen_every=1, batch_size=4)   # 6 steps an epoch
    extra = ["--save-every", str(save_every)] + (["--method", method] if method else [])
    proc = subprocess.Popen([sys.executable, "-m", "backmix", "-q", *cli_args(cfg), *extra], cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = Path(cfg.out) / "last.pt"
    if save_every:   # killed in epoch 2 or 3, past its second step
        ckpt = stop_when(proc, last, lambda c: c.get("partial") and c["epoch"] >= 1
                         and c["partial"][0]["loader"]["step"] >= 2)
    else:
        ckpt = stop_when(proc, last, lambda c: True)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert ckpt["epoch"] < 3 and torch.load(last, weights_only=False)["epoch"] == ckpt["epoch"]
    done = subprocess.run([sys.executable, "-m", "backmix", "-q", *cli_args(cfg), *extra, "--resume"], cwd=REPO,
                          env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    straight = tiny(small_root, tmp_path / "straight", epochs=3, regen_every=1, batch_size=4)
    subprocess.run([sys.executable, "-m", "backmix", "-q", *cli_args(straight), *extra], cwd=REPO, env=env(),
                   check=True, capture_output=True, timeout=300)
    a, b = read_jsonl(Path(cfg.out) / "metrics.jsonl"), read_jsonl(Path(straight.out) / "metrics.jsonl")
    assert [r["epoch"] for r in a] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for key in ("loss", "train_acc", "images", "cache_generation", "eval"):
            assert ra[key] == rb[key], (ra["epoch"], key)
    wa = torch.load(Path(cfg.out) / "last.pt", weights_only=False)["state_dict"]
    wb = torch.load(Path(straight.out) / "last.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("accumulate", [1, 2], ids=["every-batch", "grad-accum-2"])
def test_two_process_gloo_run_keeps_ranks_identical_and_evaluates(small_root, tmp_path, accumulate):
    """With --grad-accum-steps 2 the ranks exchange gradients on every second batch only (and the last):
    their weights stay equal all the same."""
    cfg = tiny(small_root, tmp_path / "ddp", epochs=2, regen_every=1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "backmix", "-q", *cli_args(cfg),
           "--grad-accum-steps", str(accumulate)]
    done = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = read_jsonl(Path(cfg.out) / "metrics.jsonl")
    assert [r["epoch"] for r in lines] == [1, 2]          # rank 0 alone writes the run files
    assert lines[0]["regenerated"] == 1 and lines[1]["cache_generation"] == 1   # one shared cache build
    digests = lines[-1]["weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    # each rank trains on its half of the known training images (24 less the validation rows), none dropped
    from backmix.osr_data.open_set import load_data
    assert lines[0]["images"] == len(load_data(cfg.data, cfg.split, cfg.val_fraction, cfg.seed).known_rows) == 22
    assert "accuracy" in lines[-1]["eval"] and "AUROC (MSP)" in done.stdout


@pytest.mark.parametrize("regen", ["loop", "pass"])
def test_resume_publishes_a_rebuild_cut_short_by_a_kill(small_root, tmp_path, monkeypatch, regen):
    """Killed after epoch 1's shards and checkpoint but before the publish: --resume publishes those shards
    (loop: the in-loop CAMs are not recomputed from end-of-epoch weights) and goes on as an unbroken run."""
    import backmix.cam_cache.precompute as pre

    def killed(*args, **kwargs):
        raise KeyboardInterrupt   # stands in for SIGKILL right before the publish

    cfg = tiny(small_root, tmp_path / "cut", epochs=2, regen_every=1, regen=regen)
    monkeypatch.setattr(pre, "publish_generation", killed)
    with pytest.raises(KeyboardInterrupt):
        main(cfg)
    assert torch.load(Path(cfg.out) / "last.pt", weights_only=False)["regen_pending"]
    assert (Path(cfg.out) / "cache" / "next-000001" / "shard-0-of-1.arrow").is_file()
    monkeypatch.undo()
    monkeypatch.setattr(pre, "compute_cams", lambda *a, **k: pytest.fail("the finished shard was recomputed"))
    if regen == "loop":
        monkeypatch.setattr(pre.GenerationWriter, "add_canvases", lambda *a: pytest.fail("rows were re-added"))
    main(cfg, resume=True)
    monkeypatch.undo()
    straight = tiny(small_root, tmp_path / "whole", epochs=2, regen_every=1, regen=regen)
    main(straight)
    a, b = read_jsonl(Path(cfg.out) / "metrics.jsonl"), read_jsonl(Path(straight.out) / "metrics.jsonl")
    assert [r["regenerated"] for r in a if "regenerated" in r] == [1]
    assert [r["cache_generation"] for r in a] == [r["cache_generation"] for r in b] == [0, 1]
    assert a[-1]["eval"] == b[-1]["eval"] and a[-1]["loss"] == b[-1]["loss"]
    assert_same_cache_files(Path(cfg.out) / "cache", Path(straight.out) / "cache")


def assert_same_cache_files(one: Path, two: Path) -> None:
    """The same generation files, byte for byte, and no pending build left in either."""
    names = sorted(p.name for p in one.iterdir() if p.name != ".publish.lock")
    assert names == sorted(p.name for p in two.iterdir() if p.name != ".publish.lock")
    assert not [n for n in names if n.startswith("next-")], names
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def frozen(monkeypatch) -> None:
    """Models the trainer builds keep their weights (SGD at lr 0) and BatchNorm statistics (momentum 0)."""
    import backmix.trainers.train as train_mod
    build = train_mod.build_model

    def frozen_model(*args, **kw):
        model = build(*args, **kw)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = 0.0
        return model

    monkeypatch.setattr(train_mod, "build_model", frozen_model)
    monkeypatch.setattr(train_mod, "build_optimizer", lambda cfg, model: torch.optim.SGD(model.parameters(), lr=0.0))


def test_in_loop_generation_of_a_frozen_model_equals_the_separate_pass(small_root, tmp_path, monkeypatch):
    from backmix.cam_cache import ForegroundCache, build_generation, init_cache
    from backmix.models import build_model, load_model
    from backmix.osr_data.normalize import IMAGENET_MEAN, IMAGENET_STD
    from backmix.osr_data.open_set import load_data

    frozen(monkeypatch)
    cfg = tiny(small_root, tmp_path / "loop", epochs=2, regen_every=1, regen="loop")
    main(cfg)
    line = read_jsonl(Path(cfg.out) / "metrics.jsonl")[0]
    assert line["regenerated"] == 1 and 0 < line["regen_in_loop_s"] <= line["regen_s"]
    model, _ = load_model(Path(cfg.out) / "last.pt")
    torch.manual_seed(cfg.seed)
    initial = build_model("cnn32", 2, width=cfg.width).state_dict()
    assert all(torch.equal(model.state_dict()[k], initial[k]) for k in initial if "num_batches" not in k)
    data = load_data(small_root, cfg.split, cfg.val_fraction, cfg.seed)
    init_cache(tmp_path / "pass", data.train, grid=cfg.grid)
    assert build_generation(tmp_path / "pass", model, data.train, canvas=cfg.canvas, mean=IMAGENET_MEAN,
                            std=IMAGENET_STD, momentum=cfg.momentum, label_map=data.label_map,
                            rows=data.known_rows, num_workers=0, device="cpu", progress=False) == 1
    loop = ForegroundCache(cfg.cache_dir, index=data.train)
    sep = ForegroundCache(tmp_path / "pass")
    a, b = np.asarray(loop.maps, np.float32), np.asarray(sep.maps, np.float32)
    known = data.label_map[data.train.labels] >= 0
    trained = np.zeros_like(known)
    trained[data.known_rows] = True                                    # the validation rows stay out
    assert not np.all(a[trained] == 0.5) and np.all(a[~trained] == 0.5) and known[~trained].any()
    # CAMs taken in other batch compositions may differ by a float32 ulp: at most one float16 step
    assert np.abs(a - b).max() <= 2.0 ** -11
    with pytest.raises(BackMixError, match="unknown --regen 'both'"):
        tiny(small_root, tmp_path / "bad", regen="both")


KILLING_RUN = """
import os, signal, sys
import backmix.cam_cache.precompute as pre
where, nth = sys.argv[1], int(sys.argv[2])
owner = pre.GenerationWriter if where == "add_canvases" else pre
real, calls = getattr(owner, where), []

def killing(*args, **kwargs):
    calls.append(1)
    if len(calls) == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)

setattr(owner, where, killing)
from backmix.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("where, nth, saved_epoch", [("add_canvases", 2, 1), ("publish_generation", 1, 2)],
                         ids=["mid-epoch", "before-publish"])
def test_sigkill_in_a_rebuild_epoch_and_resume_equal_an_unbroken_run(small_root, tmp_path, where, nth,
                                                                      saved_epoch):
    """--regen loop, rebuild after epoch 2 of 3. SIGKILL at the 2nd batch of epoch 2 (its in-loop CAMs half
    taken), or once its shards and checkpoint are on disk but before the publish; then --resume."""
    cfg = tiny(small_root, tmp_path / "killed", epochs=3, regen_every=2)
    args = [*cli_args(cfg), "--regen", "loop"]
    killed = subprocess.run([sys.executable, "-c", KILLING_RUN, where, str(nth), "-q", *args], cwd=REPO,
                            env=env(), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    ckpt = torch.load(Path(cfg.out) / "last.pt", weights_only=False)
    assert ckpt["epoch"] == saved_epoch and ckpt["regen_pending"] == (saved_epoch == 2)
    assert json.loads((Path(cfg.out) / "cache" / "CURRENT").read_text())["generation"] == 0   # intact
    done = subprocess.run([sys.executable, "-m", "backmix", "-q", *args, "--resume"], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    straight = tiny(small_root, tmp_path / "straight", epochs=3, regen_every=2)
    subprocess.run([sys.executable, "-m", "backmix", "-q", *cli_args(straight), "--regen", "loop"], cwd=REPO,
                   env=env(), check=True, capture_output=True, timeout=300)
    a, b = read_jsonl(Path(cfg.out) / "metrics.jsonl"), read_jsonl(Path(straight.out) / "metrics.jsonl")
    assert [r["epoch"] for r in a] == [1, 2, 3] and [r.get("regenerated") for r in b] == [None, 1, None]
    for ra, rb in zip(a, b):
        for key in ("loss", "train_acc", "cache_generation", "eval"):
            assert ra[key] == rb[key], (ra["epoch"], key)
    assert a[1]["regenerated"] == 1
    assert_same_cache_files(Path(cfg.out) / "cache", Path(straight.out) / "cache")
    wa = torch.load(Path(cfg.out) / "last.pt", weights_only=False)["state_dict"]
    wb = torch.load(Path(straight.out) / "last.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


FAILING_PUBLISH = """
import os, sys
import backmix.cam_cache.precompute as pre
from backmix.osr_data.errors import BackMixError
from backmix.osr_data.split_folder import write_split

def failing(*args, **kwargs):
    raise BackMixError("injected publish failure")

if os.environ["RANK"] == "0":
    pre.publish_generation = failing
from backmix.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_failed_publish_on_rank_0_ends_every_rank_with_the_error(small_root, tmp_path):
    """2 gloo ranks (started as torchrun would, so each one's exit and output are its own); rank 0's publish
    fails: both exit with status 2 and the same one-line error, none waits in a collective."""
    cfg = tiny(small_root, tmp_path / "ddp", epochs=2, regen_every=1)
    port = str(free_port())
    procs = []
    start = time.monotonic()
    for rank in (0, 1):
        e = {**env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, "-c", FAILING_PUBLISH, "-q", *cli_args(cfg)], cwd=REPO,
                                      env=e, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        errs = [p.communicate(timeout=max(1.0, start + 60 - time.monotonic()))[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [2, 2], errs
    for err in errs:
        assert "Traceback" not in err, err
        lines = [line for line in err.splitlines() if line.startswith("backmix: error:")]
        assert lines == [f"backmix: error: cache rebuild in {cfg.cache_dir} failed on rank 0: "
                         "injected publish failure"], err
    assert json.loads((cfg.cache_dir / "CURRENT").read_text())["generation"] == 0


def test_experiment_pairs_methods_per_split_and_seed(tmp_path, capsys):
    from backmix.bench.experiment import run_experiment
    from backmix.bench.experiment_report import COLUMNS
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
    assert text.index("| dataset | variant − reference |") < text.index("| dataset | method | runs |")
    cells = []
    for key, _ in COLUMNS:
        d = np.array([results[i + 1]["metrics"][key] - results[i]["metrics"][key] for i in (0, 2)]) * 100
        cells.append(f"{d.mean():+.1f} ± {d.std(ddof=1):.1f} ({int((d > 0).sum())}/2)")
    assert "| digits | backmix-mixed − baseline | 2 | " + " | ".join(cells) + " |" in text
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
    for change, says in (({"augment": "rrc"}, "augment crop there, rrc asked"),
                         ({"canvas_mode": "stretch"}, "canvas_mode center there, stretch asked"),
                         ({"box_fraction": 0.5}, "box_fraction")):
        with pytest.raises(BackMixError, match=f"holds runs of another budget \\({says}"):
            run_experiment(tmp_path, ["digits"], 1, {**overrides, **change}, seeds=2, methods=("backmix-mixed",))
    again = run_experiment(tmp_path, ["digits"], 1, overrides, seeds=2, methods=("backmix-mixed",))
    assert again == results and len((tmp_path / "results.jsonl").read_text().splitlines()) == 4
    # the same tables; the status line counts this call's plan (the 2 backmix-mixed runs)
    assert capsys.readouterr().out == text.replace("all 4 runs", "all 2 runs").replace("baseline, backmix-mixed;",
                                                                                       "backmix-mixed;")
    with pytest.raises(BackMixError, match="unknown method 'mixup'"):
        run_experiment(tmp_path, ["digits"], 1, overrides, methods=("mixup",))
    with pytest.raises(BackMixError, match="--seeds must be at least 1"):
        run_experiment(tmp_path, ["digits"], 1, overrides, seeds=0)
    assert text.startswith("Complete: all 4 runs of the plan (digits: 1 split x seeds +0,1 x baseline, "
                           "backmix-mixed; budget epochs 1, width 0.25, lr 0.05, arch cnn32, batch_size 128, "
                           "val_fraction 0.1)")
    assert "| Δ AUROC (energy) |" in text and "| Δ OSCR (energy) |" in text
    assert all(r["best"]["selected_by"] == "validation closed-set accuracy" for r in results)
    log_lines = (tmp_path / "experiment.log").read_text().splitlines()
    assert sum(" done digits split 0 seed " in line for line in log_lines) == 4
    assert any("epoch 1/1" in line for line in log_lines)            # the trainer's progress, too


def test_the_default_plan_orders_complete_pairs_of_every_data_set_first():
    from backmix.bench.experiment_plan import make_plan, plan_runs
    runs = plan_runs(make_plan(None, None, None), 5)
    assert len(runs) == len(set(runs)) == 5 * (2 * 2 + 1) + 5 * 2 + 5 * 2
    assert [tuple(r) for r in runs[:7]] == [
        ("digits-on-photos", 0, 0, "baseline"), ("digits-on-photos", 0, 0, "backmix"),
        ("digits-on-photos", 0, 0, "backmix-mixed"), ("digits", 0, 0, "baseline"), ("digits", 0, 0, "backmix"),
        ("digits-on-photos-p80", 0, 0, "baseline"), ("digits-on-photos-p80", 0, 0, "backmix")]
    assert all(r.seed == 0 for r in runs[:35]) and {(r.dataset, r.method) for r in runs[35:]} == {
        ("digits-on-photos", "baseline"), ("digits-on-photos", "backmix")}
    only = plan_runs(make_plan(["digits-on-photos-p80"], None, None), 2)
    assert [(r.split, r.method) for r in only] == [(0, "baseline"), (0, "backmix"), (1, "baseline"), (1, "backmix")]
    with pytest.raises(BackMixError, match="unknown data set 'mnist'"):
        make_plan(["mnist"], None, None)


def test_experiment_refuses_a_folder_of_runs_of_an_earlier_layout(tmp_path):
    from backmix.bench.experiment import run_experiment
    old = {"dataset": "digits", "split": 0, "seed": 0, "method": "baseline", "metrics": {},
           "config": {"epochs": 1, "width": 0.25, "lr": 0.05, "arch": "cnn32", "batch_size": 128}}
    (tmp_path / "results.jsonl").write_text(json.dumps(old) + "\n")
    with pytest.raises(BackMixError, match="results.jsonl: result 1 was written by an earlier backmix \\(it has no "
                                           "config.val_fraction\\): `backmix experiment` with another --out rewrites it$"):
        run_experiment(tmp_path, ["digits"], 1, {"epochs": 1, "width": 0.25, "batch_size": 128})
    del old["seed"]
    (tmp_path / "results.jsonl").write_text(json.dumps(old) + "\n")
    with pytest.raises(BackMixError, match="result 1 was written by an earlier backmix \\(it has no seed\\)"):
        run_experiment(tmp_path, ["digits"], 1, {"epochs": 1, "width": 0.25, "batch_size": 128})


def test_experiment_refuses_a_foreign_results_line_and_an_out_that_is_a_file(tmp_path):
    from backmix.bench.experiment import run_experiment
    overrides = {"epochs": 1, "width": 0.25, "batch_size": 128}
    (tmp_path / "f").write_text("")
    with pytest.raises(BackMixError, match="--out .*f is a file; an experiment needs a folder"):
        run_experiment(tmp_path / "f", ["digits"], 1, overrides)
    (tmp_path / "results.jsonl").write_text('{"dataset": "digits", "split": 0}\n{"cut by a kil')
    with pytest.raises(BackMixError, match="result 1 is not a run of `backmix experiment` \\(its 'method'"):
        run_experiment(tmp_path, ["digits"], 1, overrides)
    assert not (tmp_path / "data").exists()     # refused before any data set is prepared


def test_a_run_claimed_by_a_live_process_is_left_to_it_and_a_dead_claim_is_redone(tmp_path):
    from backmix.bench.experiment import run_experiment
    from backmix.bench.experiment_plan import Run, run_dir
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for method, pid in (("baseline", os.getppid()), ("backmix", int(dead.stdout))):
        folder = run_dir(tmp_path, Run("digits", 0, 0, method))
        folder.mkdir(parents=True)
        (folder / ".claim").write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
        (folder / "last.pt").write_bytes(b"left by a killed run")
    overrides = {"epochs": 1, "width": 0.25, "device": "cpu", "batch_size": 128}
    results = run_experiment(tmp_path, ["digits"], 1, overrides)
    assert [(r["method"], r["seed"]) for r in results] == [("backmix", 0)]
    assert (tmp_path / "results.md").read_text().startswith("**Partial**: 1 of 2 runs of the plan")
    assert not (run_dir(tmp_path, Run("digits", 0, 0, "backmix")) / ".claim").exists()
    assert (run_dir(tmp_path, Run("digits", 0, 0, "baseline")) / "last.pt").is_file()   # left to its owner


def test_two_experiment_processes_share_one_folder_without_repeating_a_run(tmp_path):
    cmd = [sys.executable, "-m", "backmix", "-q", "experiment", "--out", str(tmp_path), "--datasets", "digits",
           "--splits", "1", "--seeds", "2", "--methods", "baseline,backmix", "--budget", "quick", "--epochs", "1",
           "--width", "0.25", "--device", "cpu"]
    procs = [subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    assert all(p.wait(timeout=600) == 0 for p in procs), [p.stderr.read() for p in procs]
    lines = read_jsonl(tmp_path / "results.jsonl")
    assert sorted((r["seed"], r["method"]) for r in lines) == [(0, "backmix"), (0, "baseline"), (1, "backmix"),
                                                               (1, "baseline")]
    assert (tmp_path / "results.md").read_text().startswith("Complete: all 4 runs of the plan")
    log_text = (tmp_path / "experiment.log").read_text()
    assert log_text.count(" done digits split 0 seed ") == 4


@pytest.mark.parametrize("extra, message", [
    (["--known", "ant"], "an open-set split needs at least 2 known classes and 1 unknown one; got 1 known (ant)"),
    (["--known", "ant,bee,cat,dog"], "must name distinct classes, at least one and not all"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
    (["--width", "inf"], "--width must be a finite number > 0, got inf"),
    (["--warmup-epochs", "-1"], "--warmup-epochs must be a finite number >= 0, got -1.0"),
    (["--seed", "-1"], "--seed (seed) must be a whole number in [0, 2**63), got -1"),
    (["--weight-decay", "-0.1"], "--weight-decay must be a finite number >= 0, got -0.1"),
    (["--momentum", "1.5"], "--momentum must be a finite number in [0, 1], got 1.5"),
    (["--save-every", "-2"], "--save-every must be a finite number >= 0, got -2"),
    (["--epochs", "0"], "--epochs must be a finite number >= 1, got 0"),
    (["--canvas", "36"], "multiple of the grid"),
])
def test_bad_training_input_is_one_line_before_any_work(small_root, tmp_path, capsys, extra, message):
    cfg = tiny(small_root, tmp_path / "bad")
    args = cli_args(cfg)
    at = args.index("--known")
    if extra[0] == "--known":
        del args[at:at + 2]
    assert cli_main(args + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("backmix: error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "bad" / "last.pt").exists()


def test_an_out_that_is_a_file_or_not_writable_is_refused_first(small_root, tmp_path, capsys, monkeypatch):
    import tempfile
    file = tmp_path / "taken"
    file.write_text("not a folder")
    assert cli_main(cli_args(tiny(small_root, file))) == 2
    assert capsys.readouterr().err == f"backmix: error: --out {file} is a file; a run needs a folder\n"

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", denied)   # what a read-only folder answers
    assert cli_main(cli_args(tiny(small_root, tmp_path / "ro"))) == 2
    assert capsys.readouterr().err == f"backmix: error: --out {tmp_path / 'ro'} cannot be written: Permission denied\n"


def test_a_run_folder_that_stops_taking_files_is_one_line(small_root, tmp_path, capsys, monkeypatch):
    import backmix.trainers.run_files as run_files

    def read_only(path, *args, **kwargs):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(run_files, "save_checkpoint", read_only)
    cfg = tiny(small_root, tmp_path / "run", epochs=1)
    assert cli_main(cli_args(cfg)) == 2
    # best.pt is written before last.pt (a last.pt on disk implies its best.pt)
    assert capsys.readouterr().err == f"backmix: error: cannot write {cfg.out}/best.pt: Read-only file system\n"


def test_eval_of_a_run_folder_suggests_its_checkpoints(finished_run, capsys):
    run = finished_run.out
    assert cli_main(["eval", "--checkpoint", run, "--data", finished_run.data, "--device", "cpu"]) == 2
    assert capsys.readouterr().err == (f"backmix: error: checkpoint {run} is a folder; pass a checkpoint file "
                                       f"in it, {run}/best.pt or {run}/last.pt\n")


def test_on_error_skip_trains_and_evaluates_past_a_broken_image(small_root, tmp_path, capsys):
    import shutil
    root = tmp_path / "broken"
    # Indexed after breaking: a file changed since indexing is another failure (the index is stale).
    shutil.copytree(small_root, root, ignore=shutil.ignore_patterns("index.csv"))
    for split in ("train", "test"):
        next(iter(sorted((root / split / "ant").iterdir()))).write_bytes(b"not an image")
    cfg = tiny(root, tmp_path / "run", epochs=1, regen_every=0, val_fraction=0.0)
    assert cli_main(cli_args(cfg)) == 2
    assert "does not decode" in capsys.readouterr().err
    shutil.rmtree(cfg.out)
    assert cli_main(cli_args(cfg) + ["--on-error", "skip"]) == 0
    line = read_jsonl(Path(cfg.out) / "metrics.jsonl")[0]
    assert line["images"] == 23 and line["eval"]["num_known"] == 11      # one training, one test image skipped
    capsys.readouterr()
    ev = ["eval", "--checkpoint", f"{cfg.out}/last.pt", "--data", str(root), "--workers", "0", "--device", "cpu",
          "--json"]
    assert cli_main(ev) == 2 and "does not decode" in capsys.readouterr().err
    assert cli_main(ev + ["--on-error", "skip"]) == 0
    assert json.loads(capsys.readouterr().out)["num_known"] == 11


def test_an_open_test_folder_is_reported_under_its_name(small_root, tmp_path, capsys):
    rng = np.random.default_rng(1)
    write_split(tmp_path / "ood-set", rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8), np.zeros(5, int),
                ("whatever",))
    cfg = tiny(small_root, tmp_path / "run", epochs=1, backmix=False, open_test=[str(tmp_path / "ood-set")])
    metrics = main(cfg)
    held_out, ood = metrics, metrics["open_test"]["ood-set"]
    assert (ood["num_known"], ood["num_unknown"], held_out["num_unknown"]) == (12, 5, 12)
    assert ood["accuracy"] == held_out["accuracy"] and {"auroc_energy", "oscr_mls", "fpr95_msp"} <= set(ood)
    assert read_jsonl(Path(cfg.out) / "metrics.jsonl")[-1]["eval"]["open_test"] == {"ood-set": ood}
    assert f"vs ood-set: AUROC (MSP) {ood['auroc_msp']:.4f}" in capsys.readouterr().out
    assert cli_main(["eval", "--checkpoint", f"{cfg.out}/last.pt", "--data", str(small_root), "--workers", "0",
                     "--device", "cpu", "--open-test", str(tmp_path / "ood-set")]) == 0
    printed = capsys.readouterr().out
    assert "unknowns: held-out classes (12 images)" in printed and "unknowns: ood-set (5 images)" in printed
    assert cli_main(cli_args(tiny(small_root, tmp_path / "run2")) + ["--open-test", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.endswith(f"backmix: error: --open-test {tmp_path / 'none'} is not a folder of images\n")


def test_experiment_on_a_users_folder_pairs_backmix_with_the_baseline_of_its_compute(small_root, tmp_path):
    from backmix.bench.experiment import run_experiment
    overrides = dict(epochs=1, width=0.25, batch_size=16, device="cpu")
    methods = ("baseline", "baseline-2view", "backmix", "backmix-p50")
    results = run_experiment(tmp_path, None, 1, overrides, data=small_root, methods=methods)
    assert [r["method"] for r in results] == list(methods)
    assert all(r["dataset"] == small_root.name and r["config"]["data"] == str(small_root) for r in results)
    assert not (tmp_path / "data").exists()            # nothing prepared: the user's folder is read as it is
    text = (tmp_path / "results.md").read_text()
    by = {r["method"]: r["metrics"] for r in results}
    equal_compute = text[text.index("At equal compute"):text.index("Against the plain baseline")]
    for method, reference in (("backmix", "baseline-2view"), ("backmix-p50", "baseline")):
        d = (by[method]["auroc_mls"] - by[reference]["auroc_mls"]) * 100
        row = next(line for line in equal_compute.splitlines() if f"| {method} − {reference} |" in line)
        assert row.split(" | ")[5].startswith(f"{d:+.1f} ± 0.0")   # Δ AUROC (MLS), one pair
    assert "| baseline-2view | 1 | 2 |" in text and "| backmix-p50 | 1 | 1 |" in text   # passes per image
    with pytest.raises(BackMixError, match="--data and --datasets"):
        run_experiment(tmp_path, ["digits"], 1, overrides, data=small_root)


def test_experiment_takes_a_repeated_splits_run_from_the_earlier_split_with_its_known_classes(tmp_path):
    """The published CIFAR10 splits 0 and 1 know the same six classes: split 1's run is split 0's, copied
    (never trained twice), and it is what training split 1 itself gives."""
    from backmix.osr_data.protocols import protocol
    from backmix.bench.experiment import run_experiment
    entries = protocol("cifar10").entries
    assert set(entries[0][0]) == set(entries[1][0]) and set(entries[2][0]) != set(entries[0][0])
    classes = protocol("cifar10").classes
    rng = np.random.default_rng(1)
    root = tmp_path / "c10"
    for part, per_class in (("train", 6), ("test", 2)):
        labels = np.repeat(np.arange(len(classes)), per_class)
        write_split(root / part, rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8), labels, classes)
    overrides = dict(epochs=1, width=0.25, batch_size=16, device="cpu", protocol="cifar10", val_fraction=0.0)
    results = run_experiment(tmp_path / "exp", None, 2, overrides, data=root, methods=("baseline",))
    by_split = {r["split"]: r for r in results}
    assert sorted(by_split) == [0, 1]
    assert by_split[1]["same_run_as"] == {"split": 0} and "same_run_as" not in by_split[0]
    assert by_split[1]["metrics"] == by_split[0]["metrics"]
    assert not (tmp_path / "exp" / "runs" / "cifar10" / "split1").exists()
    assert "split 1 of cifar10 seed 0 baseline: the known classes of split 0" in (tmp_path / "exp" / "experiment.log").read_text()
    own = main(TrainConfig(data=str(root), out=str(tmp_path / "own1"), split="1", protocol="cifar10",
                           **{k: v for k, v in by_split[0]["config"].items()
                              if k not in ("data", "out", "split", "protocol")}))
    assert own == by_split[0]["metrics"]


def test_an_experiment_killed_inside_a_run_resumes_that_run_from_its_checkpoint(small_root, tmp_path):
    """kill -9 after a run's first epoch checkpoint; the next command resumes it (not from scratch), and its
    result equals an uninterrupted experiment's bit for bit."""
    from backmix.bench.experiment import run_experiment
    overrides = dict(epochs=3, width=0.25, device="cpu")
    whole = run_experiment(tmp_path / "whole", None, 1, overrides, data=small_root, methods=("baseline",))
    cmd = [sys.executable, "-m", "backmix", "-q", "experiment", "--out", str(tmp_path / "cut"), "--data",
           str(small_root), "--splits", "1", "--methods", "baseline", "--epochs", "3", "--width", "0.25",
           "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    checkpoint = tmp_path / "cut" / "runs" / small_root.name / "split0" / "seed0" / "baseline" / "last.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists() and not (tmp_path / "cut" / "results.jsonl").exists()
    cut = run_experiment(tmp_path / "cut", None, 1, overrides, data=small_root, methods=("baseline",))
    assert cut[0]["metrics"] == whole[0]["metrics"]
    log_text = (tmp_path / "cut" / "experiment.log").read_text()
    assert f"resume {small_root.name} split 0 seed 0 baseline from its checkpoint" in log_text
    after = log_text.split("resume ")[1]
    assert "epoch 3/3" in after and "epoch 1/3" not in after   # the resumed attempt did not train epoch 1 again
