"""Each rule of a loader's arguments is checked in one place (``LoaderConfig``, and for what a backend
refuses, ``check_backend_config``): ``backmix train`` refuses the same options with the same line, since it
builds its training loader's config from them (``loader_config``)."""
from __future__ import annotations

import pytest

from backmix.osr_data.errors import BackMixError
from backmix.pipeline.config import LoaderConfig
from backmix.pipeline.loaders import check_backend_config
from backmix.trainers.config import TrainConfig

# (the run's options, the loader's arguments): the same bad choice, said to each.
CASES = {
    "mix-prob-without-backmix": (dict(mix_prob=0.5, backmix=False), dict(mix_prob=0.5, backmix=False)),
    "mix-prob-above-1": (dict(mix_prob=1.5), dict(mix_prob=1.5)),
    "mix-prob-0": (dict(mix_prob=0.0), dict(mix_prob=0.0)),
    "two-views-with-backmix": (dict(views=2), dict(views=2)),
    "three-views": (dict(views=3, backmix=False), dict(views=3, backmix=False)),
    "batch-size-0": (dict(batch_size=0), dict(batch_size=0)),
    "workers-negative": (dict(workers=-1), dict(num_workers=-1)),
    "box-fraction-1": (dict(box_fraction=1.0), dict(box_fraction=1.0)),
    "top-k-ratio-0": (dict(top_k_ratio=0.0), dict(top_k_ratio=0.0)),
    "seed-negative": (dict(seed=-1), dict(seed=-1)),
    "on-error": (dict(on_error="ignore"), dict(on_error="ignore")),
    "augment": (dict(augment="cutout"), dict(augment="cutout")),
    "canvas-mode": (dict(canvas_mode="squash"), dict(canvas_mode="squash")),
    "auto-augment": (dict(auto_augment="autoaugment"), dict(auto_augment="autoaugment")),
    "crop-from-image-without-rrc": (dict(crop_from="image"), dict(crop_from="image")),
}


def refusal(make) -> str:
    with pytest.raises(BackMixError) as e:
        make()
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("run, loader", CASES.values(), ids=CASES)
def test_the_trainer_refuses_a_loader_option_with_the_loaders_own_line(run, loader):
    said = refusal(lambda: LoaderConfig(**loader))
    assert refusal(lambda: TrainConfig(**run)) == said


@pytest.mark.parametrize("name, flag", [("mix_prob", "--mix-prob"), ("batch_size", "--batch-size"),
                                        ("num_workers", "--workers"), ("seed", "--seed")])
def test_a_loader_line_names_the_argument_and_the_flag(name, flag):
    bad = {"mix_prob": 2.0, "batch_size": 0, "num_workers": -1, "seed": -1}[name]
    said = refusal(lambda: LoaderConfig(**{name: bad}))
    assert said.startswith(f"{flag} ({name}) ")


def test_mix_prob_0_is_the_loader_without_backmix_and_1_mixes_every_image():
    assert LoaderConfig(mix_prob=1.0).mix_prob == 1.0
    assert TrainConfig(mix_prob=1).mix_prob == 1
    assert refusal(lambda: LoaderConfig(mix_prob=0)) == "--mix-prob (mix_prob) must lie in (0, 1], got 0"


def test_dali_refuses_auto_augment_in_one_place_that_the_trainer_reaches_too():
    augmented = LoaderConfig(auto_augment="trivialaugment")
    said = refusal(lambda: check_backend_config("dali", augmented))
    assert said.startswith("--auto-augment (auto_augment) runs in the torch batch transform")
    assert refusal(lambda: TrainConfig(auto_augment="trivialaugment", backend="dali")) == said
    check_backend_config("dali", LoaderConfig(auto_augment="trivialaugment", train=False))   # evaluation: none runs
    for backend in ("reference", "torchvision", "ffcv", "ray"):
        check_backend_config(backend, augmented)
    assert TrainConfig(auto_augment="trivialaugment", backend="reference").auto_augment == "trivialaugment"


def test_a_config_value_of_another_type_is_one_line():
    said = refusal(lambda: TrainConfig(batch_size=2.5))
    assert said == "batch_size must be a whole number (int), not float (2.5)"
