"""A run SIGKILLed inside a --regen loop rebuild epoch resumes at the step it was saved at (--save-every),
its recorded CAMs taken back from beside last.pt: the same weights, metrics and published generation as
an unbroken run, bit for bit."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backmix.models.checkpoint import read_checkpoint

from test_trainer import REPO, assert_same_cache_files, cli_args, env, free_port, read_jsonl, tiny

# 3 epochs of 6 steps (22 training rows, batches of 4); epoch 2 (index 1) rebuilds the cache in the loop.
OPTIONS = ["--regen", "loop", "--save-every", "1"]

KILL_AT_CALL = """
import importlib, os, signal, sys
module, name, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
owner = importlib.import_module(module)
if "." in name:
    cls, name = name.split(".")
    owner = getattr(owner, cls)
real, calls = getattr(owner, name), []

def killing(*args, **kwargs):
    calls.append(1)
    if len(calls) == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)

setattr(owner, name, killing)
from backmix.cli import main
sys.exit(main(sys.argv[4:]))
"""

RECORD = ("backmix.cam_cache.precompute", "GenerationWriter.add_canvases")
SAVE = ("backmix.trainers.train", "save_mid_epoch")


def train(cfg, *extra: str, check: bool = True, quiet: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "backmix", *(["-q"] if quiet else []), *cli_args(cfg), *OPTIONS,
                           *extra], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert not check or done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def unbroken(small_root, tmp_path_factory):
    cfg = tiny(small_root, tmp_path_factory.mktemp("runs") / "straight", epochs=3, regen_every=2, batch_size=4)
    train(cfg)
    assert not (Path(cfg.out) / "in-loop-cams").exists()   # the recorded CAMs go once the shard is staged
    return cfg


@pytest.mark.parametrize("hook, nth, saved_step", [
    (RECORD, 1, None),   # as step 1 takes its CAMs: last.pt is epoch 1's end
    (RECORD, 3, 2),      # as step 3 does: last.pt holds steps 1-2 and their 8 recorded rows
    (RECORD, 6, 5),      # at the epoch's last step
    (SAVE, 5 + 3, 2),    # step 3's CAMs written beside last.pt, but not the last.pt that names them
], ids=["step-1", "step-3", "last-step", "between-cams-and-last.pt"])
def test_a_kill_inside_a_rebuild_epoch_resumes_at_its_step(small_root, tmp_path, unbroken, hook, nth, saved_step):
    cfg = tiny(small_root, tmp_path / "killed", epochs=3, regen_every=2, batch_size=4)
    run = Path(cfg.out)
    killed = subprocess.run([sys.executable, "-c", KILL_AT_CALL, *hook, str(nth), "-q", *cli_args(cfg), *OPTIONS],
                            cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ckpt = read_checkpoint(run / "last.pt")   # weights_only: the recorded maps are not in it
    assert json.loads((run / "cache" / "CURRENT").read_text())["generation"] == 0
    if saved_step is None:
        assert ckpt["epoch"] == 1 and not ckpt.get("partial")
    else:
        part = ckpt["partial"][0]
        assert ckpt["epoch"] == 1 and part["loader"]["step"] == saved_step
        assert part["in_loop"]["rows"] == 4 * saved_step
        assert (run / "in-loop-cams" / part["in_loop"]["file"]).is_file()
    if hook == SAVE:   # the file of the save that was cut is there too, named by no checkpoint
        assert part["in_loop"]["file"] == "rank-0-of-1-epoch-1-step-2.arrow"
        assert (run / "in-loop-cams" / "rank-0-of-1-epoch-1-step-3.arrow").is_file()

    done = train(cfg, "--resume", quiet=False)
    step = f", step {saved_step + 1}" if saved_step else ""
    assert f"at epoch 2/3{step}" in done.stderr, done.stderr[-3000:]
    a, b = read_jsonl(run / "metrics.jsonl"), read_jsonl(Path(unbroken.out) / "metrics.jsonl")
    assert [r["epoch"] for r in a] == [1, 2, 3] and [r.get("regenerated") for r in a] == [None, 1, None]
    for ra, rb in zip(a, b):
        for key in ("loss", "train_acc", "images", "cache_generation", "eval"):
            assert ra[key] == rb[key], (ra["epoch"], key)
    assert_same_cache_files(run / "cache", Path(unbroken.out) / "cache")   # the published generation 1 included
    wa = read_checkpoint(run / "last.pt")["state_dict"]
    wb = read_checkpoint(Path(unbroken.out) / "last.pt")["state_dict"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not (run / "in-loop-cams").exists()


def test_a_resume_without_the_recorded_cams_it_needs_is_one_line(small_root, tmp_path):
    cfg = tiny(small_root, tmp_path / "killed", epochs=3, regen_every=2, batch_size=4)
    run = Path(cfg.out)
    killed = subprocess.run([sys.executable, "-c", KILL_AT_CALL, *RECORD, "3", "-q", *cli_args(cfg), *OPTIONS],
                            cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    saved = run / "in-loop-cams" / read_checkpoint(run / "last.pt")["partial"][0]["in_loop"]["file"]
    moved = saved.rename(tmp_path / saved.name)
    done = train(cfg, "--resume", check=False)
    assert done.returncode == 2 and done.stderr.splitlines()[-1] == (
        f"backmix: error: {run / 'last.pt'} was saved part-way through a cache rebuild epoch, and {saved}, the "
        "CAMs recorded until then, is missing; the run cannot continue without it"), done.stderr[-3000:]
    # another file of recorded CAMs under its name (here: the same rows, one map changed) is refused too
    import numpy as np
    from backmix.cam_cache.generation_file import MappedMaps, write_maps
    part = MappedMaps(moved)
    maps = np.array(part.maps)
    maps[0, 0, 0] = 0.25 if maps[0, 0, 0] != 0.25 else 0.5
    write_maps(saved, np.array(part.rows), np.asarray(part.labels, np.int64), maps,
               {k: v for k, v in part.meta.items() if k not in ("format", "grid", "crc32")})
    done = train(cfg, "--resume", check=False)
    assert done.returncode == 2 and "is not the file of recorded CAMs that was saved with the checkpoint" in \
        done.stderr.splitlines()[-1], done.stderr[-3000:]


def two_ranks(args: list[str], script: str = "") -> list[subprocess.Popen]:
    """Rank 0 and 1 of a gloo run, started as torchrun would (each one's exit status its own), finished."""
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, *(["-c", script] if script else ["-m", "backmix"]), *args], cwd=REPO,
                              env={**env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                                   "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    try:
        for p in procs:
            p.stderr_text = p.communicate(timeout=300)[1]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return procs


@pytest.fixture(scope="module")
def unbroken_two_ranks(small_root, tmp_path_factory):
    cfg = tiny(small_root, tmp_path_factory.mktemp("runs") / "straight-ddp", epochs=3, regen_every=2, batch_size=4)
    done = two_ranks(["-q", *cli_args(cfg), *OPTIONS])
    assert [p.returncode for p in done] == [0, 0], done[0].stderr_text[-3000:] + done[1].stderr_text[-3000:]
    return cfg


@pytest.mark.parametrize("nth, saved_step", [(1, None), (3, 2)], ids=["step-1", "step-3"])
def test_two_ranks_killed_inside_a_rebuild_epoch_resume_each_with_its_own_cams(small_root, tmp_path,
                                                                             unbroken_two_ranks, nth, saved_step):
    """2 gloo ranks, 3 steps an epoch each (11 rows a rank); both SIGKILLed as their nth batch of the rebuild
    epoch is recorded. Each rank takes back its own rows and its own BatchNorm statistics (a rank's CAMs
    use its own, which DDP does not keep equal between steps)."""
    cfg = tiny(small_root, tmp_path / "killed", epochs=3, regen_every=2, batch_size=4)
    run = Path(cfg.out)
    killed = two_ranks([*RECORD, str(nth), "-q", *cli_args(cfg), *OPTIONS], KILL_AT_CALL)
    assert [p.returncode for p in killed] == [-signal.SIGKILL] * 2, killed[0].stderr_text[-3000:]
    ckpt = read_checkpoint(run / "last.pt")
    if saved_step is None:
        assert ckpt["epoch"] == 1 and not ckpt.get("partial") and len(ckpt["rank_buffers"]) == 2
    else:
        assert [(p["loader"]["step"], p["in_loop"]["rows"], p["in_loop"]["file"]) for p in ckpt["partial"]] == [
            (2, 8, "rank-0-of-2-epoch-1-step-2.arrow"), (2, 8, "rank-1-of-2-epoch-1-step-2.arrow")]
    resumed = two_ranks(["-q", *cli_args(cfg), *OPTIONS, "--resume"])
    assert [p.returncode for p in resumed] == [0, 0], resumed[0].stderr_text[-3000:] + resumed[1].stderr_text[-3000:]
    a, b = read_jsonl(run / "metrics.jsonl"), read_jsonl(Path(unbroken_two_ranks.out) / "metrics.jsonl")
    assert [r.get("regenerated") for r in a] == [None, 1, None] and a[1]["images"] == 22
    for ra, rb in zip(a, b):
        for key in ("loss", "train_acc", "images", "cache_generation", "eval", "weight_digests"):
            assert ra.get(key) == rb.get(key), (ra["epoch"], key)
    assert_same_cache_files(run / "cache", Path(unbroken_two_ranks.out) / "cache")
    assert not (run / "in-loop-cams").exists()
