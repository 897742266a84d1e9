"""Loading a checkpoint never runs code: a pickle payload is refused with one line at every entry point,
and ``.safetensors`` weights load where a checkpoint does."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from backmix.cli import main as cli_main
from backmix.models import build_model, load_model, save_checkpoint, save_safetensors
from backmix.osr_data.errors import BackMixError
from backmix.trainers.config import TrainConfig

from helpers import random_image_root

CLASSES = ("ant", "bee", "cat", "dog")


class Payload:
    """Unpickling this creates ``marker`` (harmless, but it is code run by the loader)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return random_image_root(tmp_path_factory.mktemp("ckpt-data"), CLASSES, 6, 3)


def write_payload(path: Path, marker: Path) -> Path:
    model = build_model("cnn32", 2, width=0.25)
    torch.save({"arch": "cnn32", "num_classes": 2, "model_kwargs": {"width": 0.25},
                "state_dict": model.state_dict(), "known_classes": ["ant", "cat"], "epoch": 1,
                "rng": {"numpy": Payload(marker)}}, path)
    return path


def entry_points(root: Path, tmp: Path, ckpt: Path) -> dict:
    run = ckpt.parent
    cfg = TrainConfig(data=str(root), out=str(run), epochs=2, width=0.25, batch_size=4, split="ant,cat",
                      workers=0, device="cpu", progress=False)
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    return {
        "eval": ["eval", "--checkpoint", str(ckpt), "--data", str(root), "--device", "cpu", "--workers", "0"],
        "train --resume": ["train", "--data", str(root), "--out", str(run), "--resume", "--device", "cpu",
                           "--workers", "0", "--no-progress"],
        "cache build": ["cache", "build", "--checkpoint", str(ckpt), "--data", str(root / "train"),
                        "--cache", str(tmp / "cache"), "--device", "cpu", "--workers", "0", "--no-progress"],
    }


@pytest.mark.parametrize("command", ["eval", "train --resume", "cache build"])
def test_a_pickle_payload_is_refused_by_every_command_and_never_runs(root, tmp_path, capsys, command):
    marker = tmp_path / "MARKER"
    ckpt = write_payload(tmp_path / "last.pt", marker)
    assert cli_main(entry_points(root, tmp_path, ckpt)[command]) == 2
    err = capsys.readouterr().err
    assert err == (f"backmix: error: checkpoint {ckpt} needs io.open to load, not only tensors and plain "
                   f"values; refused, because unpickling it could run code\n")
    assert not marker.exists()
    assert not (tmp_path / "cache").exists()


def test_a_pickle_payload_is_refused_by_load_model(tmp_path):
    marker = tmp_path / "MARKER"
    ckpt = write_payload(tmp_path / "model.pt", marker)
    with pytest.raises(BackMixError, match=f"checkpoint {ckpt} needs io.open to load"):
        load_model(ckpt)
    assert not marker.exists()


def test_a_checkpoint_saved_with_every_kind_of_run_state_loads_with_weights_only(tmp_path):
    from backmix.trainers.resume import rng_state, set_rng_state
    model = build_model("cnn32", 2, width=0.25)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.zeros(2, 3, 32, 32)).sum().backward()
    opt.step()
    np.random.seed(7)
    state = rng_state()
    save_checkpoint(tmp_path / "c.pt", model, arch="cnn32", num_classes=2, model_kwargs={"width": 0.25},
                    optimizer=opt.state_dict(), rng=state, config={"seed": 1})
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    expected = np.random.rand(3)
    np.random.seed(0)
    set_rng_state(ckpt["rng"])
    assert np.array_equal(np.random.rand(3), expected)


def test_safetensors_weights_load_where_a_checkpoint_does(root, tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model("cnn32", 2, width=0.25)
    path = save_safetensors(tmp_path / "w.safetensors", model, arch="cnn32", num_classes=2,
                            model_kwargs={"width": 0.25}, known_classes=("ant", "cat"))
    loaded, ckpt = load_model(path)
    assert ckpt["known_classes"] == ["ant", "cat"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert cli_main(["eval", "--checkpoint", str(path), "--data", str(root), "--device", "cpu",
                     "--workers", "0"]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_a_safetensors_file_without_backmix_metadata_is_one_line(tmp_path):
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(BackMixError, match="has no backmix metadata"):
        load_model(tmp_path / "bare.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(BackMixError, match="is not a readable safetensors file"):
        load_model(tmp_path / "junk.safetensors")


@pytest.mark.parametrize("command", ["eval", "cache build"])
def test_a_run_folder_as_checkpoint_names_its_files(root, tmp_path, capsys, command):
    run = tmp_path / "run"
    run.mkdir()
    args = entry_points(root, tmp_path, run / "best.pt")[command]
    args[args.index("--checkpoint") + 1] = str(run)
    assert cli_main(args) == 2
    assert capsys.readouterr().err == (f"backmix: error: checkpoint {run} is a folder; pass a checkpoint file "
                                       f"in it, {run}/best.pt or {run}/last.pt\n")
