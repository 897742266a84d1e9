"""The trainer's options for large runs: ``--grad-accum-steps`` and ``--compile``."""
from __future__ import annotations

import contextlib
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from backmix.models import build_model
from backmix.pipeline.batch import BackMixBatch
from backmix.trainers.accumulation import Accumulation, optimizer_steps
from backmix.trainers.config import TrainConfig
from backmix.trainers.epoch import train_one_epoch
from backmix.trainers.optim import build_optimizer, build_scheduler
from backmix.trainers.precision import Precision
from backmix.trainers.recipe import Recipe
from backmix.trainers.run_log import RunLog
from backmix.trainers.train import main

from test_trainer import read_jsonl, tiny


def test_windows_of_an_epoch_whose_length_n_does_not_divide():
    windows = Accumulation(2, 5)
    assert [i for i in range(5) if windows.starts(i)] == [0, 2, 4]
    assert [i for i in range(5) if windows.steps(i)] == [1, 3, 4]
    assert [windows.share(i) for i in range(5)] == [0.5, 0.5, 0.5, 0.5, 1.0]   # the short last window: its mean
    assert optimizer_steps(5, 2) == 3 and optimizer_steps(4, 2) == 2 and optimizer_steps(5, 1) == 5
    with pytest.raises(Exception, match="--grad-accum-steps must be a finite number >= 1, a whole one, got 0"):
        TrainConfig(data="d", grad_accum_steps=0)
    with pytest.raises(Exception, match="--grad-accum-steps must be .* got 1.5"):
        TrainConfig(data="d", grad_accum_steps=1.5)
    assert TrainConfig(data="d", grad_accum_steps=2.0).grad_accum_steps == 2


def test_ddp_exchanges_gradients_on_a_windows_last_batch_only():
    class Replicated(nn.Module):   # DistributedDataParallel's no_sync, recorded
        def __init__(self):
            super().__init__()
            self.quiet = []

        @contextlib.contextmanager
        def no_sync(self):
            self.quiet.append(self.batch)
            yield

    model, windows = Replicated(), Accumulation(3, 7)
    for model.batch in range(7):
        with windows.sync(model, model.batch):
            pass
    assert model.quiet == [0, 1, 3, 4]                    # steps after batches 2, 5 and 6
    with Accumulation(3, 7).sync(nn.Linear(1, 1), 0):     # a module of one process: nothing to silence
        pass


class Batches:
    """A loader of fixed batches: what ``train_one_epoch`` asks of one."""

    def __init__(self, batches: list) -> None:
        self.batches, self.step = batches, 0

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        while self.step < len(self.batches):
            self.step += 1
            yield self.batches[self.step - 1]
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]


def per_image(model: nn.Module) -> nn.Module:
    """``model`` with its BatchNorm and Dropout layers held in eval mode whatever ``train()`` says."""
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.Dropout2d)):
            m.eval()
            m.train = types.MethodType(lambda self, mode=True: self, m)
    return model


def trained(batches: list, accumulate: int) -> tuple[dict, int]:
    cfg = TrainConfig(data="d", epochs=1, progress=False, log_every=0, grad_accum_steps=accumulate, clip_grad=1.0)
    torch.manual_seed(0)
    model = per_image(build_model("cnn32", 4, width=0.25))
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, optimizer_steps(len(batches), accumulate))
    train_one_epoch(model, Batches(batches), optimizer, scheduler, cfg, Precision(torch.device("cpu"), "off"), 0,
                    recipe=Recipe(cfg, 4), run_log=RunLog(cfg, enabled=False))
    return model.state_dict(), scheduler.last_epoch


def test_two_accumulated_batches_of_32_step_as_one_batch_of_64():
    """The default model, cnn32, has BatchNorm (statistics of the batch it sees) and Dropout2d (masks drawn
    per forward): 2 x 32 images cannot normalise or drop as 64 do. Both are held in eval mode here (running
    statistics, no dropout), so each image's gradient is its own, and the accumulation itself is compared:
    two optimiser steps (SGD, momentum, weight decay, warm-up, clipping) on 2 x 64 images."""
    g = torch.Generator().manual_seed(1)
    big = [BackMixBatch(None, torch.randn(64, 3, 32, 32, generator=g), torch.randn(64, 3, 32, 32, generator=g),
                        torch.randint(0, 4, (64,), generator=g), torch.zeros(64, dtype=torch.int64),
                        torch.arange(64)) for _ in range(2)]
    halves = [BackMixBatch(*(None if t is None else t[h * 32:(h + 1) * 32] for t in b)) for b in big for h in (0, 1)]
    want, want_steps = trained(big, 1)
    got, got_steps = trained(halves, 2)
    assert want_steps == got_steps == 2
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    plain, plain_steps = trained(halves, 1)            # the same batches stepped one by one: another result
    assert plain_steps == 4 and not torch.allclose(plain["fc.weight"], want["fc.weight"], atol=1e-4)


def test_a_run_cut_inside_a_window_resumes_to_the_same_result(small_root, tmp_path, monkeypatch):
    """--grad-accum-steps 2, a checkpoint at every optimiser step, 11 batches an epoch (a short last window),
    a rebuild after epoch 1. Cut at the second batch of a window in epoch 2 (the first one's gradients
    accumulated, not stepped): last.pt is at the window's start, and --resume ends bit-equal to an unbroken run."""
    common = dict(epochs=2, batch_size=2, regen_every=1, grad_accum_steps=2, save_every=1)
    straight = tiny(small_root, tmp_path / "straight", **common)
    main(straight)
    first = torch.load(Path(straight.out) / "last.pt", weights_only=False)
    assert first["scheduler"]["last_epoch"] == 2 * 6          # 11 batches: 6 optimiser steps an epoch

    cut = tiny(small_root, tmp_path / "cut", **common)
    real, calls = Recipe.inputs, []

    def inputs(self, batch, epoch, step):
        calls.append(epoch)
        if epoch == 1 and calls.count(1) == 6:          # the batch at position 5 of epoch 2
            raise KeyboardInterrupt
        return real(self, batch, epoch, step)

    monkeypatch.setattr(Recipe, "inputs", inputs)
    with pytest.raises(KeyboardInterrupt):
        main(cut)
    monkeypatch.setattr(Recipe, "inputs", real)
    saved = torch.load(Path(cut.out) / "last.pt", weights_only=False)
    assert saved["epoch"] == 1 and saved["partial"][0]["loader"]["step"] == 4   # the window [4, 5] is repeated
    main(cut, resume=True)
    done = torch.load(Path(cut.out) / "last.pt", weights_only=False)
    assert all(torch.equal(done["state_dict"][k], first["state_dict"][k]) for k in first["state_dict"])
    assert done["optimizer"]["state"].keys() == first["optimizer"]["state"].keys()
    assert all(torch.equal(done["optimizer"]["state"][k]["momentum_buffer"],
                           first["optimizer"]["state"][k]["momentum_buffer"]) for k in first["optimizer"]["state"])
    a, b = read_jsonl(Path(cut.out) / "metrics.jsonl"), read_jsonl(Path(straight.out) / "metrics.jsonl")
    for x, y in zip(a, b):
        assert (x["loss"], x["train_acc"], x["eval"] if "eval" in x else None) == \
               (y["loss"], y["train_acc"], y["eval"] if "eval" in y else None)


def test_compile_trains_on_the_cpu_and_its_run_resumes(small_root, tmp_path, monkeypatch):
    """--compile: the training forward runs compiled graphs (TorchInductor's C++ kernels on the CPU); the
    checkpoints hold the plain module's state dict; a run cut in epoch 2 resumes, compiled again, to its end."""
    from backmix.models import load_model
    torch._dynamo.reset()
    cfg = tiny(small_root, tmp_path / "run", epochs=2, regen_every=1, save_every=1, compile=True)
    real, calls = Recipe.inputs, []

    def inputs(self, batch, epoch, step):
        calls.append(epoch)
        if epoch == 1 and calls.count(1) == 2:
            raise KeyboardInterrupt
        return real(self, batch, epoch, step)

    monkeypatch.setattr(Recipe, "inputs", inputs)
    with pytest.raises(KeyboardInterrupt):
        main(cfg)
    monkeypatch.setattr(Recipe, "inputs", real)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1   # the forward was compiled
    cut = torch.load(Path(cfg.out) / "last.pt", weights_only=False)
    assert cut["epoch"] == 1 and cut["partial"][0]["loader"]["step"] == 1
    plain = build_model("cnn32", 2, width=0.25).state_dict()
    assert cut["state_dict"].keys() == plain.keys()                        # no "_orig_mod." prefix
    main(cfg, resume=True)
    model, done = load_model(Path(cfg.out) / "last.pt", arch="cnn32", num_classes=2)
    assert done["epoch"] == 2 and done["config"]["compile"] is True
    assert [r["epoch"] for r in read_jsonl(Path(cfg.out) / "metrics.jsonl")] == [1, 2]


def test_a_run_config_of_an_earlier_layout_is_refused_in_one_line(tmp_path):
    import json
    from backmix.osr_data.errors import BackMixError
    saved = TrainConfig().to_dict()
    assert TrainConfig.from_dict(saved) == TrainConfig()
    for lacking in ("canvas_mode", "val_fraction"):
        path = tmp_path / f"{lacking}.json"
        path.write_text(json.dumps({k: v for k, v in saved.items() if k != lacking}))
        with pytest.raises(BackMixError, match=f"^run config {path}: config was written by an earlier backmix "
                                               f"\\(it has no {lacking}\\): `backmix train` writes a run of this one$"):
            TrainConfig.load(path)
