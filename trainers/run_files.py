"""The run folder (``--out``): what a run writes there, each write one line on failure.

RUN/config.json and config.yaml (the run's settings), metrics.jsonl (a line per epoch, appended and
fsync'd as each ends), summary.json, last.pt and best.pt. Whole files are written atomically
(``backmix._fs``); the folder is checked before any work and held by one run at a time
(``run_lock``).
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from torch import nn

from backmix._fs import atomic_write_bytes, check_output_folder
from backmix.models import save_checkpoint
from backmix.osr_data.errors import BackMixError

from .config import TrainConfig
from .config_file import write_config_yaml


@contextlib.contextmanager
def writing(path: Path):
    """A write into the run folder: an OSError (read-only, disk full, gone) is one line naming the file."""
    try:
        yield
    except OSError as e:
        raise BackMixError(f"cannot write {path}: {e.strerror or e}") from None


def check_run_folder(run: Path) -> None:
    """--out: a folder (made here) that takes files, checked before any work."""
    check_output_folder(run, "--out", "a run")


def check_out_outside_data(cfg: TrainConfig) -> None:
    """--out never lies inside a folder the run reads images from: its folder would be a class folder
    there (without images, or with checkpoints beside the images)."""
    run = cfg.run_dir.resolve()
    read = [Path(cfg.data) / split for split in ("train", "test")]
    read += [Path(folder) for folder in cfg.open_test if folder]   # an empty one is refused as such, later
    for folder in read:
        if folder.resolve() == run or folder.resolve() in run.parents:
            raise BackMixError(f"--out {cfg.run_dir} is inside the data folder {folder}; choose a run folder "
                               "outside the image folders")


def check_new_run(run: Path, resume: bool) -> None:
    """A new run never writes over a run's checkpoints: a finished or cut run is continued with --resume."""
    if not resume and (run / "last.pt").exists():
        raise BackMixError(f"{run} already holds a run; pass --resume to continue it or choose another --out")


def save_run_checkpoint(path: Path, model: nn.Module, cfg: TrainConfig, num_classes: int, **state) -> None:
    with writing(path):
        save_checkpoint(path, model, arch=cfg.arch, num_classes=num_classes, model_kwargs=cfg.model_kwargs,
                        **state)


def write_json(path: Path, value) -> None:
    with writing(path):
        atomic_write_bytes(path, (json.dumps(value, indent=2) + "\n").encode())


def write_run_config(run: Path, cfg: TrainConfig) -> None:
    """RUN/config.json (what --resume reads) and RUN/config.yaml (what --config takes back)."""
    write_json(run / "config.json", cfg.to_dict())
    with writing(run / "config.yaml"):
        write_config_yaml(run / "config.yaml", cfg)


def write_jsonl(path: Path, records: list[dict]) -> None:
    with writing(path):
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in records).encode())


def read_jsonl(path: Path) -> list[dict]:
    """The complete lines of a JSON-lines file (a line cut short by a kill is ignored)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def append_jsonl(path: Path, record: dict) -> None:
    with writing(path), open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
