"""The training recipe (label smoothing, EMA, gradient clipping, SyncBN, auto augment, pretrained
weights, Mixup/CutMix with soft targets), the step logging sinks and ``--config``.

One shared 1-epoch run on a small random data set carries most options at once; the rest are
unit tests on tensors.
"""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from backmix.cli import build_parser
from backmix.cli import main as cli_main
from backmix.models import build_model, read_checkpoint
from backmix.osr_data.errors import BackMixError
from backmix.pipeline.augment import AutoAugment
from backmix.pipeline.batch import BackMixBatch
from backmix.trainers.cli import config_from_args
from backmix.trainers.config import TrainConfig
from backmix.trainers.recipe import Recipe, load_pretrained, sync_batchnorm
from backmix.trainers.eval_checkpoint import evaluate_checkpoint
from backmix.trainers.precision import Precision

from helpers import random_image_root

CLASSES = ("ant", "bee", "cat", "dog")


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    """root/train (12 a class) and root/test (6 a class) of random 32x32 RGB images, 4 classes."""
    return random_image_root(tmp_path_factory.mktemp("small"), CLASSES, 12, 6)


def train_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(root), "--out", str(out), "--epochs", "1", "--width", "0.25",
            "--batch-size", "8", "--known", "ant,cat", "--workers", "0", "--device", "cpu", "--regen-every", "0",
            *extra]


RECIPE = ("--log-every", "1", "--log", "csv,tensorboard", "--ema", "0.5", "--label-smoothing", "0.1",
          "--clip-grad", "1.0", "--auto-augment", "randaugment", "--mixup", "0.4", "--cutmix", "1.0")


@pytest.fixture(scope="module")
def recipe_run(small_root, tmp_path_factory) -> Path:
    """One epoch (3 steps of 8) with every recipe option and both log sinks; progress lines on (every
    tenth of the epoch: no minimum interval between them here)."""
    from backmix.trainers import run_log
    out = tmp_path_factory.mktemp("runs") / "recipe"
    logger = logging.getLogger("backmix")
    level, seconds = logger.level, run_log.PROGRESS_SECONDS
    logger.setLevel(logging.INFO)
    run_log.PROGRESS_SECONDS = 0.0
    try:
        assert cli_main(train_args(small_root, out, *RECIPE)) == 0
    finally:
        logger.setLevel(level)
        run_log.PROGRESS_SECONDS = seconds
    return out


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_step_and_epoch_csv_and_tensorboard_read_back(recipe_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    steps, epochs = read_csv(recipe_run / "steps.csv"), read_csv(recipe_run / "epochs.csv")
    assert [int(r["global_step"]) for r in steps] == [1, 2, 3]
    assert all(0 <= float(r["data_wait"]) <= 1 and float(r["images_per_s"]) > 0 for r in steps)
    record = json.loads((recipe_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert len(epochs) == 1 and float(epochs[0]["accuracy"]) == record["eval"]["accuracy"]
    assert float(epochs[0]["loss"]) == record["loss"]

    events = EventAccumulator(str(recipe_run / "tensorboard"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([float(r["loss"]) for r in steps], rel=1e-6)
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([float(r["lr"]) for r in steps], rel=1e-6)
    auroc = events.Scalars("eval/auroc_msp")
    assert [(e.step, e.value) for e in auroc] == [(1, pytest.approx(record["eval"]["auroc_msp"], rel=1e-6))]


def test_a_resumed_run_drops_the_csv_rows_logged_after_its_checkpoint(recipe_run, tmp_path):
    from backmix.trainers.run_log import RunLog
    for name in ("steps", "epochs"):
        (tmp_path / f"{name}.csv").write_text((recipe_run / f"{name}.csv").read_text())
    with open(tmp_path / "steps.csv", "a") as f:
        f.write("1,3,3,0.5,10")   # a row cut short by a kill
    cfg = TrainConfig.load(recipe_run / "config.json")
    with RunLog(cfg, enabled=True) as run_log:
        run_log.open(tmp_path, first_step=2, first_epoch=0)
        run_log.steps({"epoch": 1, "step": 3, "global_step": 3, "loss": 0.25, "images_per_s": 1.0, "lr": 0.1,
                       "data_wait": 0.5})
    steps = read_csv(tmp_path / "steps.csv")
    assert steps[:2] == read_csv(recipe_run / "steps.csv")[:2]
    assert [(r["global_step"], r["loss"]) for r in steps] == [("1", steps[0]["loss"]), ("2", steps[1]["loss"]),
                                                              ("3", "0.25")]
    assert read_csv(tmp_path / "epochs.csv") == []


def test_a_resumed_run_keeps_the_tensorboard_events_of_its_checkpoint_step(recipe_run, tmp_path):
    """Resumed after step 2 (in its checkpoint), the run logs step 3 again: the events equal an
    uninterrupted run's, step 2 kept and the interrupted run's step 3 replaced."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from backmix.trainers.run_log import RunLog
    shutil.copytree(recipe_run / "tensorboard", tmp_path / "tensorboard")
    cfg = TrainConfig.load(recipe_run / "config.json")
    with RunLog(cfg, enabled=True) as run_log:
        run_log.open(tmp_path, first_step=2, first_epoch=0)
        run_log.steps({"epoch": 1, "step": 3, "global_step": 3, "loss": 0.25, "images_per_s": 1.0, "lr": 0.1,
                       "data_wait": 0.5})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    before = [e.value for e in EventAccumulator(str(recipe_run / "tensorboard")).Reload().Scalars("train/loss")]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (1, before[0]), (2, before[1]), (3, 0.25)]


@pytest.mark.parametrize("sink, in_the_way", [("csv", "steps.csv"), ("tensorboard", "tensorboard")])
def test_a_log_sink_that_cannot_be_written_is_named(recipe_run, tmp_path, sink, in_the_way):
    from backmix.trainers.run_log import RunLog
    cfg = TrainConfig.load(recipe_run / "config.json")
    cfg.log = sink
    if sink == "csv":
        (tmp_path / in_the_way).mkdir()        # a folder where the file goes
    else:
        (tmp_path / in_the_way).write_text("")  # a file where the folder goes
    with RunLog(cfg, enabled=True) as run_log:
        with pytest.raises(BackMixError, match=f"cannot write {tmp_path / in_the_way}: "):
            run_log.open(tmp_path)


def test_eval_of_an_ema_runs_last_pt_gives_the_metrics_the_run_reported_for_it(recipe_run, small_root):
    summary = json.loads((recipe_run / "summary.json").read_text())
    got = evaluate_checkpoint(recipe_run / "last.pt", small_root, device="cpu", workers=0, progress=False)
    assert got == pytest.approx(summary["last"]["test"])
    raw = read_checkpoint(recipe_run / "last.pt")
    assert any(not torch.equal(raw["state_dict"][k], v) for k, v in raw["ema_state_dict"].items())   # two weights
    with pytest.raises(BackMixError, match="is the data's own folder"):   # its test images are no unknowns
        evaluate_checkpoint(recipe_run / "last.pt", small_root, device="cpu", workers=0,
                            open_test=(str(small_root / "test"),))


def test_step_lines_and_progress_lines_reach_the_run_log(recipe_run):
    text = (recipe_run / "train.log").read_text()
    # --log-every 1 on 3 steps, each also a tenth of the epoch (stderr is not a terminal under pytest)
    for step, share in ((1, 33), (2, 66), (3, 100)):
        assert f"epoch 1/1 step {step}/3 ({share}%): loss " in text
    assert "data wait" in text and "lr " in text and "epoch 1/1  loss" in text


def test_progress_lines_off_a_terminal_are_at_most_one_per_interval(small_root, tmp_path, caplog):
    """A short epoch off a terminal prints its epoch line, not a progress line per step."""
    caplog.set_level(logging.INFO, logger="backmix")
    assert cli_main(train_args(small_root, tmp_path / "run", "--log-every", "0")) == 0
    assert "epoch 1/1  loss" in caplog.text and "(33%)" not in caplog.text and "(100%)" not in caplog.text


def test_run_config_yaml_round_trips_and_the_command_line_overrides_it(recipe_run, small_root, tmp_path):
    saved = TrainConfig.load(recipe_run / "config.json")

    def config(*argv: str) -> TrainConfig:
        argv = ["train", *argv]
        return config_from_args(build_parser(argv).parse_args(argv))[0]

    again = config("--config", str(recipe_run / "config.yaml"))
    assert again == saved
    other = config("--config", str(recipe_run / "config.yaml"), "--out", str(tmp_path / "b"), "--ema", "0.25")
    assert other.to_dict() == {**saved.to_dict(), "out": str(tmp_path / "b"), "ema": 0.25}
    (tmp_path / "mine.yaml").write_text(f"data: {small_root}\nsplit: 1\nbatch-size: 16\nlr: 1\n")
    mine = config("--config", str(tmp_path / "mine.yaml"))
    assert (mine.data, mine.split, mine.batch_size, mine.lr, mine.out) == (str(small_root), "1", 16, 1.0, "runs/quick")


@pytest.mark.parametrize("text, message", [
    ("batch_size: 8\nbogus: 1\n", "unknown option 'bogus'"),
    ("batch_size: eight\n", "batch_size must be int, got 'eight'"),
    ("ema: true\n", "ema must be int or float, got True"),
    ("- a\n- b\n", "must be a mapping of option: value"),
    ("lr: [1\n", "is not valid YAML"),
    ("ema: 1.5\n", "--ema must be a finite number in (0, 1), or 0 for none, got 1.5"),
])
def test_a_bad_config_file_is_one_line(small_root, tmp_path, capsys, text, message):
    (tmp_path / "run.yaml").write_text(text)
    assert cli_main(["train", "--data", str(small_root), "--out", str(tmp_path / "r"),
                     "--config", str(tmp_path / "run.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("backmix: error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("extra, message", [
    (["--ema", "1"], "--ema must be a finite number in (0, 1), or 0 for none, got 1.0"),
    (["--label-smoothing", "1"], "--label-smoothing must be a finite number in [0, 1), got 1.0"),
    (["--clip-grad", "-1"], "--clip-grad must be a finite number >= 0, got -1.0"),
    (["--mixup", "nan"], "--mixup must be a finite number >= 0, got nan"),
    (["--log-every", "-1"], "--log-every must be a finite number >= 0, got -1"),
    (["--log", "csv,wandb"], "unknown --log sink 'wandb'"),
    (["--auto-augment", "trivialaugment", "--backend", "dali"], "--auto-augment (auto_augment) runs in the torch batch transform"),
    ([], "--data is required"),
])
def test_bad_recipe_options_are_one_line(small_root, tmp_path, capsys, extra, message):
    args = train_args(small_root, tmp_path / "r", *extra)
    if not extra:
        del args[1:3]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("backmix: error: ") and err.count("\n") == 1 and message in err


def test_resume_refuses_another_ema(recipe_run, capsys):
    assert cli_main(train_args(Path("unused"), recipe_run, "--resume", "--ema", "0.9")) == 2
    assert "--resume cannot change --ema" in capsys.readouterr().err


def test_best_holds_the_ema_weights_that_were_evaluated(recipe_run, small_root):
    last, best = read_checkpoint(recipe_run / "last.pt"), read_checkpoint(recipe_run / "best.pt")
    raw, ema = last["state_dict"], last["ema_state_dict"]
    assert any(not torch.equal(raw[k], ema[k]) for k in raw if raw[k].is_floating_point())
    assert best["state_dict"].keys() == ema.keys()
    assert all(torch.equal(best["state_dict"][k], ema[k]) for k in ema)
    record = json.loads((recipe_run / "metrics.jsonl").read_text().splitlines()[-1])
    again = evaluate_checkpoint(recipe_run / "best.pt", small_root, device="cpu", workers=0, progress=False)
    assert again == record["eval"]
    # trained with --auto-augment, which DALI does not run: evaluation does not augment, so DALI takes it
    dali = evaluate_checkpoint(recipe_run / "best.pt", small_root, backend="dali", device="cpu", workers=0,
                               progress=False)
    assert dali["accuracy"] == record["eval"]["accuracy"]


def test_soft_target_loss_is_the_weighted_sum_of_both_parts():
    g = torch.Generator().manual_seed(0)
    n, k = 5, 3
    images, mixed = torch.randn(n, 3, 4, 4, generator=g), torch.randn(n, 3, 4, 4, generator=g)
    labels = torch.tensor([0, 1, 2, 1, 0])
    batch = BackMixBatch(torch.zeros(n, 3, 4, 4, dtype=torch.uint8), images, mixed, labels, labels, torch.arange(n))
    logits = torch.randn(2 * n, k, generator=g, dtype=torch.float64)
    targets = torch.softmax(torch.randn(2 * n, k, generator=g, dtype=torch.float64), 1)
    got = batch.loss(nn.CrossEntropyLoss(), logits, clean=0.3, mixed=0.7, targets=targets)
    by_hand = [-(targets[p] * torch.log_softmax(logits[p], 1)).sum(1).mean() for p in (slice(0, n), slice(n, 2 * n))]
    torch.testing.assert_close(got, 0.3 * by_hand[0] + 0.7 * by_hand[1], rtol=1e-12, atol=1e-12)
    # hard labels: the same as before soft targets existed
    hard = batch.loss(nn.CrossEntropyLoss(), logits, clean=0.3, mixed=0.7)
    torch.testing.assert_close(hard, batch.loss(nn.CrossEntropyLoss(), logits, clean=0.3, mixed=0.7,
                                                targets=nn.functional.one_hot(labels.repeat(2), k).double()))


def test_mixup_mixes_each_part_within_itself_and_repeats_per_step():
    cfg = TrainConfig(data="d", mixup=1.0)
    recipe = Recipe(cfg, 2)
    g = torch.Generator().manual_seed(1)
    n = 5   # odd: the last image keeps its own label
    images, mixed = torch.randn(n, 3, 4, 4, generator=g), torch.randn(n, 3, 4, 4, generator=g)
    labels = torch.tensor([0, 0, 1, 1, 0])
    batch = BackMixBatch(torch.zeros(n, 3, 4, 4, dtype=torch.uint8), images, mixed, labels, labels, torch.arange(n))
    numpy_state = np.random.get_state()[1].copy()
    x, targets = recipe.inputs(batch, epoch=0, step=7)
    assert np.array_equal(np.random.get_state()[1], numpy_state)
    x2, targets2 = recipe.inputs(batch, epoch=0, step=7)
    assert torch.equal(x, x2) and torch.equal(targets, targets2)
    assert targets.shape == (2 * n, 2)
    for part, source in ((slice(0, n), images), (slice(n, 2 * n), mixed)):
        lam = targets[part][0, 0].item()   # labels 0 mixed with the flipped pair's 1
        torch.testing.assert_close(x[part][:4], lam * source[:4] + (1 - lam) * source[:4].flip(0))
        assert torch.equal(x[part][4], source[4]) and targets[part][4].tolist() == [1.0, 0.0]
    assert not torch.equal(images, x[:n])   # the batch's own tensors are left as they were


def test_auto_augment_is_keyed_shared_by_the_pair_and_leaves_the_global_rng():
    g = torch.Generator().manual_seed(2)
    crops = torch.randint(0, 256, (6, 3, 16, 16), generator=g, dtype=torch.uint8)
    pairs = torch.cat([crops, crops])
    aug = AutoAugment("trivialaugment")
    state = torch.get_rng_state()
    out = aug(pairs, seed=11, copies=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert out.dtype == torch.uint8 and torch.equal(out[:6], out[6:])
    assert torch.equal(out, aug(pairs, seed=11, copies=2))
    assert not torch.equal(out, aug(pairs, seed=12, copies=2))
    assert not torch.equal(out, pairs)
    # float crops (RandomResizedCrop's) are rounded to uint8 first
    assert torch.equal(aug(crops.float() + 0.2, seed=5), aug(crops, seed=5))


def test_gradients_are_clipped_to_the_norm():
    model = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loss = 1000 * model(torch.ones(2, 4)).square().sum()
    precision = Precision(torch.device("cpu"), "off")
    precision.backward(loss)
    precision.step(optimizer, clip=0.5)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert norm.item() == pytest.approx(0.5, rel=1e-5)


def test_sync_bn_needs_cuda_under_several_ranks():
    model = build_model("cnn32", 2, width=0.25)
    cfg = TrainConfig(data="d", sync_bn=True)
    assert sync_batchnorm(cfg, model, torch.device("cpu"), 1) is model
    with pytest.raises(BackMixError, match="--sync-bn needs CUDA"):
        sync_batchnorm(cfg, model, torch.device("cpu"), 2)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_pretrained_loads_all_but_the_head(tmp_path, suffix):
    torch.manual_seed(5)
    source = build_model("cnn32", 10, width=0.25)   # another class count: the head cannot be taken
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(source.state_dict(), str(path))
    else:
        torch.save({"model": source.state_dict()}, path)   # torchvision references' layout
    torch.manual_seed(6)
    model = build_model("cnn32", 2, width=0.25)
    head = model.fc.weight.clone()
    load_pretrained(model, path)
    for name, value in model.state_dict().items():
        if name.startswith("fc."):
            continue
        assert torch.equal(value, source.state_dict()[name]), name
    assert torch.equal(model.fc.weight, head)


class NotATensor:
    pass


def test_pretrained_refuses_pickled_objects_and_another_arch(tmp_path):
    model = build_model("cnn32", 2, width=0.25)
    torch.save({"state_dict": model.state_dict(), "extra": NotATensor()}, tmp_path / "pickle.pt")
    with pytest.raises(BackMixError, match="is not a state dict of tensors"):
        load_pretrained(model, tmp_path / "pickle.pt")
    torch.save(build_model("cnn32", 2, width=0.5).state_dict(), tmp_path / "wide.pt")
    with pytest.raises(BackMixError, match="has weights of another shape"):
        load_pretrained(model, tmp_path / "wide.pt")
    torch.save(build_model("wrn10_1", 2).state_dict(), tmp_path / "wrn.pt")
    with pytest.raises(BackMixError, match="has weights the model lacks"):
        load_pretrained(model, tmp_path / "wrn.pt")


def test_train_starts_from_pretrained_weights(small_root, tmp_path):
    torch.manual_seed(5)
    source = build_model("cnn32", 10, width=0.25)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    out = tmp_path / "run"
    # a learning rate too small to move a weight: last.pt holds what training started from
    assert cli_main(train_args(small_root, out, "--pretrained", str(tmp_path / "w.pt"), "--lr", "1e-30",
                               "--weight-decay", "0", "--no-progress", "--log-every", "0")) == 0
    weights = read_checkpoint(out / "last.pt")["state_dict"]
    conv = "features.1.weight"
    assert torch.equal(weights[conv], source.state_dict()[conv])


def test_the_loader_applies_auto_augment_to_training_batches_only(tiny_root):
    from backmix.osr_data.index import ImageIndex
    from backmix.pipeline import LoaderConfig, make_loader
    index = ImageIndex.load(tiny_root)

    def first_batch(**kw):
        config = LoaderConfig(batch_size=6, canvas=40, crop=32, num_workers=0, seed=3, device="cpu", **kw)
        return next(iter(make_loader("reference", index, config)))

    plain, augmented = first_batch(), first_batch(auto_augment="trivialaugment")
    assert torch.equal(plain.canvas, augmented.canvas)
    assert not torch.equal(plain.images, augmented.images) and not torch.equal(plain.mixed, augmented.mixed)
    again = first_batch(auto_augment="trivialaugment")
    assert torch.equal(again.images, augmented.images) and torch.equal(again.mixed, augmented.mixed)
    evaluation = first_batch(auto_augment="trivialaugment", train=False, shuffle=False, backmix=False)
    assert torch.equal(evaluation.images, first_batch(train=False, shuffle=False, backmix=False).images)
    with pytest.raises(BackMixError, match=r"--auto-augment \(auto_augment\) must be none or one of trivialaugment, randaugment"):
        LoaderConfig(auto_augment="autoaugment")


class Killed(Exception):
    pass


def test_a_recipe_run_cut_mid_epoch_resumes_to_the_same_weights_and_ema(small_root, tmp_path, monkeypatch):
    """Mixup/CutMix, auto augment and the EMA keep --resume bit-exact: each is a function of the step or saved."""
    import backmix.trainers.resume as resume_mod   # where the run's checkpoints are saved
    options = ("--epochs", "2", "--batch-size", "4", "--save-every", "1", "--no-progress", "--log-every", "0",
               "--ema", "0.5", "--mixup", "0.4", "--cutmix", "1.0", "--auto-augment", "trivialaugment",
               "--label-smoothing", "0.1", "--clip-grad", "1.0")
    assert cli_main(train_args(small_root, tmp_path / "straight", *options)) == 0
    save = resume_mod.save_run_checkpoint

    def save_then_die(path, *args, **state):
        save(path, *args, **state)
        if state.get("partial") and state["epoch"] == 1 and state["partial"][0]["loader"]["step"] == 3:
            raise Killed   # epoch 2, after its third step
    monkeypatch.setattr(resume_mod, "save_run_checkpoint", save_then_die)
    with pytest.raises(Killed):
        cli_main(train_args(small_root, tmp_path / "cut", *options))
    monkeypatch.setattr(resume_mod, "save_run_checkpoint", save)
    assert cli_main(train_args(small_root, tmp_path / "cut", *options, "--resume")) == 0
    a, b = (read_checkpoint(tmp_path / run / "last.pt") for run in ("cut", "straight"))
    for key in ("state_dict", "ema_state_dict"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert [r["loss"] for r in a["metrics"]] == [r["loss"] for r in b["metrics"]]


def test_the_epoch_sinks_carry_validation_energy_and_each_open_test_set(recipe_run, tmp_path):
    """epochs.csv and TensorBoard hold what metrics.jsonl holds for an epoch: the validation accuracy that
    selects best.pt, every score of the held-out classes, and the same scores against each --open-test set."""
    import dataclasses

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from backmix.trainers.run_log import OPEN_FIELDS, RunLog
    scores = {k: 0.5 + i / 100 for i, k in enumerate(("accuracy",) + OPEN_FIELDS)}
    record = {"epoch": 1, "loss": 0.7, "train_acc": 0.6, "images_per_s": 9.0, "lr": 0.1, "train_s": 2.0,
              "val": {"accuracy": 0.75, "loss": 0.9, "images": 12},
              "eval": {**scores, "open_test": {"faces": {k: v + 0.2 for k, v in scores.items()}}}}
    for folder in ("faces", "run"):
        (tmp_path / folder).mkdir()
    cfg = dataclasses.replace(TrainConfig.load(recipe_run / "config.json"), open_test=[str(tmp_path / "faces")])
    with RunLog(cfg, enabled=True) as run_log:
        run_log.open(tmp_path / "run")
        run_log.epoch_done(record)
    (row,) = read_csv(tmp_path / "run" / "epochs.csv")
    assert float(row["val_accuracy"]) == 0.75 and float(row["val_loss"]) == 0.9
    assert float(row["auroc_energy"]) == scores["auroc_energy"] and float(row["oscr_energy"]) == scores["oscr_energy"]
    assert float(row["faces/auroc_mls"]) == pytest.approx(scores["auroc_mls"] + 0.2)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"val/accuracy", "eval/auroc_energy", "open_test/faces/fpr95_energy"} <= set(tags)
    assert events.Scalars("val/accuracy")[0].value == pytest.approx(0.75)
