"""The in-loop rebuild in any training loop (``backmix.rebuilding``), alone and under 2 gloo ranks."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import backmix
from backmix.cam_cache import ForegroundCache, build_generation, init_cache
from backmix.models import build_model
from backmix.osr_data.errors import BackMixError
from backmix.osr_data.normalize import IMAGENET_MEAN, IMAGENET_STD
from backmix.trainers.config import TrainConfig
from backmix.trainers.epoch import epoch_seed
from backmix.trainers.optim import build_optimizer, build_scheduler
from backmix.trainers.train import main as train_main

REPO = Path(__file__).resolve().parents[1]


def test_own_loop_publishes_the_generation_backmix_train_regen_loop_does(small_root, tmp_path):
    """The same seed, model, optimiser and stream: an own loop with ``backmix.rebuilding`` around epoch 1
    publishes generation 1 equal, map for map, to ``backmix train --regen loop``'s."""
    cfg = TrainConfig(data=str(small_root), out=str(tmp_path / "run"), epochs=2, width=0.25, batch_size=8,
                      lr=0.05, split="ant,cat", workers=0, device="cpu", progress=False, regen_every=1,
                      regen="loop", val_fraction=0)   # the own loop below trains on every known row
    train_main(cfg)

    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)          # as the trainer runs on the CPU
    try:
        data = backmix.open_set_data(small_root, split="ant,cat")
        train = backmix.loader(data, cache=tmp_path / "own", batch_size=8, num_workers=0, device="cpu")
        torch.manual_seed(cfg.seed)
        model = build_model("cnn32", data.num_known, width=0.25)
        opt = build_optimizer(cfg, model)
        sched = build_scheduler(cfg, opt, len(train))
        criterion = torch.nn.CrossEntropyLoss()
        model.train()
        train.set_epoch(0)
        torch.manual_seed(epoch_seed(cfg.seed, 0, 0))   # dropout, as the trainer seeds it
        with backmix.rebuilding(train, model) as rec:
            for batch in train:
                rec.record(batch)
                x, _ = batch.inputs()
                loss = batch.loss(criterion, model(x))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert rec.generation == 1 and rec.cam_seconds > 0 and not refers_to(train, rec)
    own = ForegroundCache(tmp_path / "own", index=data.train)
    trained = ForegroundCache(cfg.cache_dir, index=data.train)      # epoch 1 rebuilt, the last one not
    assert own.generation == trained.generation == 1
    assert np.array_equal(np.asarray(own.maps), np.asarray(trained.maps))
    known = data.label_map[data.train.labels] >= 0
    assert not np.all(np.asarray(own.maps)[known] == 0.5)          # the known rows moved


def refers_to(loader, recorder) -> bool:
    """Whether any attribute of ``loader`` (its source's included) is ``recorder``."""
    return any(value is recorder for owner in (loader, loader.source) for value in vars(owner).values())


def test_the_loop_hands_the_batches_to_the_rebuild_and_the_loader_only_keeps_the_canvases(small_root, tmp_path,
                                                                                         caplog):
    data = backmix.open_set_data(small_root, split="ant,cat")
    train = backmix.loader(data, cache=tmp_path / "c", batch_size=8, num_workers=0, device="cpu", keep_canvas=False)
    model = build_model("cnn32", data.num_known, width=0.25)
    assert next(iter(train)).canvas is None
    train.set_epoch(1)
    with backmix.rebuilding(train, model) as rec:
        assert train.carries_canvas and not refers_to(train, rec)
        with pytest.raises(BackMixError, match="already records an in-loop rebuild"):
            backmix.rebuilding(train, model).start()
        for batch in train:
            assert batch.canvas is not None
            rec.record(batch)
    assert rec.generation == 1 and not train.carries_canvas and next(iter(train)).canvas is None
    with pytest.raises(BackMixError, match="outside the in-loop rebuild's block"):
        rec.record(batch)
    with backmix.rebuilding(train, model, enabled=False) as off:   # disabled: record does nothing
        for batch in train:
            off.record(batch)
            assert batch.canvas is None
    assert ForegroundCache(tmp_path / "c", index=data.train).generation == 1
    # A loop that hands it no batch: the pass takes every row's CAM, and says so.
    train.set_epoch(2)
    with caplog.at_level(logging.WARNING, logger="backmix"), backmix.rebuilding(train, model) as rec:
        assert sum(len(b.labels) for b in train) == len(data.known_rows)
    assert rec.generation == 2 and "no batch reached the in-loop rebuild" in caplog.text


def test_disabled_or_failed_blocks_publish_nothing(small_root, tmp_path):
    data = backmix.open_set_data(small_root, split="ant,cat")
    train = backmix.loader(data, cache=tmp_path / "c", batch_size=8, num_workers=0, device="cpu")
    model = build_model("cnn32", data.num_known, width=0.25)
    with backmix.rebuilding(train, model, enabled=False):
        n = sum(1 for _ in train)
    assert n == 3 and train.maps.generation == 0
    with pytest.raises(RuntimeError, match="stop"), backmix.rebuilding(train, model) as rec:
        rec.record(next(iter(train)))
        raise RuntimeError("stop")
    assert not refers_to(train, rec) and json.loads((tmp_path / "c" / "CURRENT").read_text())["generation"] == 0
    with pytest.raises(BackMixError, match="cache folder"):
        backmix.rebuilding(backmix.loader(data, batch_size=8, num_workers=0, device="cpu"), model)


DDP_EPOCH = """
import json, sys, torch, backmix
import backmix.cam_cache.precompute as pre
from backmix.models import build_model

def no_pass(*args, **kwargs):
    raise AssertionError("a row was left to the separate pass")

pre.compute_cams = no_pass                     # every row's CAM must come from the loop
torch.distributed.init_process_group("gloo")
root, cache, out = sys.argv[1:4]
data = backmix.open_set_data(root, split=3)
train = backmix.loader(data, cache=cache, batch_size=34, num_workers=0, device="cpu")
torch.manual_seed(0)
model = build_model("cnn32", data.num_known, width=0.25)     # not trained: its CAMs are a pass's
train.set_epoch(1)
seen = []
with backmix.rebuilding(train, model) as rec:
    for batch in train:
        rec.record(batch)
        seen += batch.indices.tolist()
rank = torch.distributed.get_rank()
json.dump({"seen": seen, "steps": len(train), "repeats": train.epoch_sampler.repeats,
           "generation": rec.generation}, open(f"{out}/rank{rank}.json", "w"))
torch.distributed.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_see_every_image_once_and_the_rebuild_covers_every_row_once(digits_root, tmp_path):
    """Split 3 of the digits has 749 known images: 375 and 374 a rank at batch 34 would give rank 1 one step
    fewer, so it repeats its first image (DistributedSampler's padding) and its CAM is taken once."""
    script = tmp_path / "epoch.py"
    script.write_text(DDP_EPOCH)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), str(digits_root), str(tmp_path / "cache"), str(tmp_path)]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    data = backmix.open_set_data(digits_root, split=3)
    assert len(data.known_rows) == 749
    assert ranks[0]["steps"] == ranks[1]["steps"] == 12                     # DDP: the same number of steps
    assert [r["repeats"] for r in ranks] == [False, True]
    assert len(ranks[0]["seen"]) == 375 and len(ranks[1]["seen"]) == 375     # 374 + the repeated one
    assert ranks[1]["seen"][-1] == ranks[1]["seen"][0]
    every = ranks[0]["seen"] + ranks[1]["seen"][:-1]
    assert sorted(every) == sorted(data.known_rows.tolist())                 # each training image once
    assert ranks[0]["generation"] == ranks[1]["generation"] == 1
    # the in-loop CAMs of the untrained model, every row from one rank's loop, equal a separate pass
    init_cache(tmp_path / "pass", data.train)
    torch.manual_seed(0)
    model = build_model("cnn32", data.num_known, width=0.25)
    build_generation(tmp_path / "pass", model, data.train, canvas=40, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                     label_map=data.label_map, rows=data.known_rows, num_workers=0, device="cpu", progress=False)
    loop = np.asarray(ForegroundCache(tmp_path / "cache").maps, np.float32)
    sep = np.asarray(ForegroundCache(tmp_path / "pass").maps, np.float32)
    assert np.abs(loop - sep).max() <= 2.0 ** -11        # CAMs in other batch compositions: a float32 ulp
    moved = np.flatnonzero((loop != 0.5).any(axis=(1, 2)))
    assert set(moved.tolist()) <= set(data.known_rows.tolist()) and len(moved) > 700
