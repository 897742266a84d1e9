"""The library's edges: a wrong kind of argument is refused at the public call that took it, naming
the argument, and what would have been a silently wrong result (a split ignored, a half-read loader
state, an accuracy of labels no logit has, a registered backend's malformed canvases, a rebuild with
another model than the loader's classes) is refused instead; a float64 model and a reused rebuilding
object do the right thing."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import backmix
from backmix.cam_cache import ForegroundCache
from backmix.models import build_model
from backmix.osr_data.errors import BackMixError
from backmix.pipeline import loaders
from backmix.pipeline.reference import WorkerSource

from helpers import random_image_root

L = dict(num_workers=0, device="cpu")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """root/train (6 a class) and root/test (3 a class), 4 classes of random 32x32 images."""
    return random_image_root(tmp_path_factory.mktemp("edges"), ("ant", "bee", "cat", "dog"), 6, 3)


@pytest.fixture(scope="module")
def data(root):
    return backmix.open_set_data(root, "ant,cat")


@pytest.mark.parametrize("call, error, says", [
    (lambda d: backmix.open_set_data(d.train.root.parent, "ant,cat", val_fraction="0.1"), TypeError,
     "val_fraction must be a number in [0, 1), not str"),
    (lambda d: backmix.open_set_data(d.train.root.parent, "ant,cat", val_fraction=0.5, seed=-1), BackMixError,
     "seed must be a whole number in [0, 2**63), got -1"),
    (lambda d: backmix.loader(d, split=3, **L), TypeError, "split=3 goes with a folder path"),
    (lambda d: backmix.loader(d, batch_size=2.5, **L), TypeError, "batch_size must be a whole number (int), not float"),
    (lambda d: backmix.loader(d, mean="abc", **L), TypeError, "mean must be a tuple or list of numbers, not str"),
    (lambda d: backmix.loader(d, num_workers=1.5, device="cpu"), TypeError, "num_workers must be a whole number"),
    (lambda d: backmix.loader(d, canvas=40.0, **L), TypeError, "canvas must be a whole number (int), not float"),
    (lambda d: backmix.loader(d, backmix=1, **L), TypeError, "backmix must be True or False, not int"),
    (lambda d: backmix.loader(d, std=(1e-40, 1, 1), **L), BackMixError, "std must be 3 finite numbers"),
    (lambda d: backmix.loader(d, mean=(1e39, 0, 0), **L), BackMixError, "mean must be 3 finite numbers (one per RGB "
                                                                       "channel), finite in float32"),
], ids=["val-fraction-a-string", "seed-negative", "split-with-open-set-data", "batch-size-a-float", "mean-a-string",
        "workers-a-float", "canvas-a-float", "backmix-an-int", "std-reciprocal-overflows", "mean-overflows-float32"])
def test_arguments_of_a_wrong_kind_or_range_are_refused_naming_them(data, call, error, says):
    with pytest.raises(error) as e:
        call(data)
    assert says in str(e.value)


def test_numpy_scalars_and_lists_are_taken_as_the_python_values(data):
    loader = backmix.loader(data, batch_size=np.int64(4), seed=np.int64(3), mean=[0.5, 0.5, 0.5],
                            box_fraction=np.float32(0.25), **L)
    cfg = loader.config
    assert (type(cfg.batch_size), type(cfg.seed), cfg.mean, type(cfg.box_fraction)) == (int, int, (0.5, 0.5, 0.5), float)
    assert len(loader) == 3   # 12 known images, 4 a batch


def test_a_mean_outside_0_1_blanks_with_the_nearest_colour(data):
    batch = next(iter(backmix.loader(data, batch_size=4, mean=(2.0, -1.0, 0.5), **L)))
    assert torch.isfinite(batch.mixed).all()


@pytest.mark.parametrize("epoch", [float("inf"), 1.9, "1", True, None])
def test_a_loader_state_of_other_than_whole_numbers_is_not_a_loader_state(data, epoch):
    loader = backmix.loader(data, **L)
    with pytest.raises(BackMixError, match="not a loader state"):
        loader.load_state_dict({"epoch": epoch, "step": 0, "skipped": 0})
    loader.load_state_dict({"epoch": 2.0, "step": np.int64(1), "skipped": 0})   # 2.0: as a JSON file may hold it
    assert loader.state_dict() == {"epoch": 2, "step": 1, "skipped": 0}


def test_metrics_refuse_a_tpr_outside_0_1_and_labels_no_logit_has():
    known, unknown = np.array([0.9, 0.5]), np.array([0.1, 0.2])
    for tpr in (2, 0, float("nan")):
        with pytest.raises(BackMixError, match=r"tpr must lie in \(0, 1\]"):
            backmix.fpr_at_tpr(known, unknown, tpr=tpr)
    with pytest.raises(TypeError, match="tpr must be a number"):
        backmix.fpr_at_tpr(known, unknown, tpr="0.95")
    logits, unknown_logits = torch.tensor([[0.1, 1.0], [0.2, 0.1]]), torch.tensor([[0.3, 0.9]])
    for labels in ([5, 1], [0, -3]):
        with pytest.raises(BackMixError, match=r"labels_known must be closed-set labels in 0\.\.1"):
            backmix.open_set_metrics(logits, torch.tensor(labels), unknown_logits)
    with pytest.raises(BackMixError, match="labels_known must hold one label per row"):
        backmix.open_set_metrics(logits, torch.tensor([1]), unknown_logits)
    assert backmix.open_set_metrics(logits, torch.tensor([1, 0]), unknown_logits)["accuracy"] == 1.0


class TallCanvases(WorkerSource):   # no ``name`` of its own: messages use the registered one
    def decode(self, path: str, size: int, mode: str) -> torch.Tensor:
        return torch.zeros(3, size + 1, size, dtype=torch.uint8)


class FloatCanvases(WorkerSource):
    def decode(self, path: str, size: int, mode: str) -> torch.Tensor:
        return torch.rand(3, size, size)


def test_register_backend_takes_a_new_name_and_a_source_and_the_core_refuses_malformed_canvases(data, monkeypatch):
    monkeypatch.setattr(loaders, "SOURCES", dict(loaders.SOURCES))   # the registrations end with the test
    with pytest.raises(TypeError, match="register_backend: source must be a subclass of .*Source, not 42"):
        loaders.register_backend("x", 42)
    with pytest.raises(TypeError, match="register_backend: source must be a subclass"):
        loaders.register_backend("x", object)
    with pytest.raises(BackMixError, match="'reference' is a built-in backend"):
        loaders.register_backend("reference", WorkerSource)
    assert "x" not in loaders.SOURCES and loaders.SOURCES["reference"] == (".reference", "WorkerSource")
    loaders.register_backend("tall", TallCanvases)
    loaders.register_backend("float", FloatCanvases)
    with pytest.raises(BackMixError, match=r"backend 'tall' made canvases of uint8 \[4, 3, 41, 40\]; a source's "
                                           r"canvases must be uint8 \[4, 3, 40, 40\]"):
        next(iter(backmix.loader(data, backend="tall", batch_size=4, **L)))
    # finished in a worker (CPU, workers), without the canvas in the batch: refused all the same
    loader = backmix.loader(data, backend="float", batch_size=4, num_workers=1, device="cpu", keep_canvas=False)
    try:
        with pytest.raises(BackMixError, match=r"backend 'float' made canvases of float32 \[4, 3, 40, 40\]"):
            next(iter(loader))
    finally:
        loader.close()


def test_rebuilding_checks_the_model_as_rebuild_does(data, tmp_path):
    train = backmix.loader(data, cache=tmp_path / "c", batch_size=8, **L)
    for start in (lambda m: backmix.rebuilding(train, m), lambda m: backmix.rebuild(train, m, progress=False)):
        with pytest.raises(BackMixError, match="model has 4 outputs, but the split has 2 known classes"):
            start(build_model("cnn32", 4, width=0.25))
        with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
            start("model")
    assert ForegroundCache(tmp_path / "c", index=data.train).generation == 0


def test_one_rebuilding_object_publishes_a_generation_per_block(data, tmp_path):
    train = backmix.loader(data, cache=tmp_path / "c", batch_size=8, **L)
    rebuild = backmix.rebuilding(train, build_model("cnn32", 2, width=0.25))
    published = []
    for epoch in range(2):
        train.set_epoch(epoch)
        with rebuild:
            assert sum(len(b.labels) for b in train if rebuild.record(b) is None) == 12
        published.append(rebuild.generation)
    assert published == [1, 2] and ForegroundCache(tmp_path / "c", index=data.train).generation == 2


def test_a_float64_model_takes_the_cams_of_its_float32_twin(data, tmp_path):
    torch.manual_seed(0)
    model = build_model("cnn32", 2, width=0.25)
    twin = build_model("cnn32", 2, width=0.25).double()
    twin.load_state_dict(model.state_dict())
    maps = {}
    for name, net in (("f32", model), ("f64", twin)):
        train = backmix.loader(data, cache=tmp_path / name, batch_size=8, **L)
        with backmix.rebuilding(train, net) as rebuild:
            for batch in train:
                rebuild.record(batch)
        assert rebuild.generation == 1
        assert backmix.rebuild(train, net, progress=False) == 2        # the separate pass too
        maps[name] = np.asarray(ForegroundCache(tmp_path / name, index=data.train).maps, dtype=np.float32)
    known = data.known_rows
    assert not np.all(maps["f32"][known] == 0.5)
    np.testing.assert_allclose(maps["f64"], maps["f32"], atol=2e-3)


def test_a_training_loader_keeps_or_drops_the_last_short_batch(data):
    """``last_batch="drop"``: full batches only (timm's Mixup pairs images); the default keeps every image."""
    kept = backmix.loader(data, batch_size=5, **L)
    dropped = backmix.loader(data, batch_size=5, last_batch="drop", **L)
    n = len(data.known_rows)
    assert n % 5 and len(kept) == -(-n // 5) and len(dropped) == n // 5
    assert all(len(b.labels) == 5 for b in dropped)
    assert sum(len(b.labels) for b in kept) == n
    with pytest.raises(ValueError, match="last_batch='drop' is for training loaders"):
        backmix.loader(data, train=False, last_batch="drop", **L)


def test_evaluate_takes_the_validation_loader_and_scores_what_selects_a_checkpoint(root):
    data = backmix.open_set_data(root, "ant,cat", val_fraction=0.5)
    model = build_model("cnn32", 2, width=0.25)
    val = backmix.loader(data, train=False, validation=True, **L)
    got = backmix.evaluate(model, val, data)
    from backmix.trainers.epoch import predict
    from backmix.trainers.precision import Precision
    logits, labels = predict(model, val, Precision(torch.device("cpu"), "auto"))
    y = torch.from_numpy(data.label_map)[labels]
    assert got["images"] == len(data.val_rows) and got["accuracy"] == float((logits.argmax(1) == y).double().mean())
    assert "auroc_msp" in backmix.evaluate(model, backmix.loader(data, train=False, **L), data)
    with pytest.raises(TypeError, match="evaluation loader"):
        backmix.evaluate(model, backmix.loader(data, **L), data)     # a training loader
