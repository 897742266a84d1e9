"""The cache's answers to damaged folders and misuse: one line, or a safe recovery; never silent loss."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from backmix.cam_cache import ForegroundCache, build_generation, init_cache
from backmix.models import Classifier32
from backmix.cam_cache.generation_file import write_maps
from backmix.cam_cache.store import build_lock, generation_path
from backmix.osr_data import BackMixError, ImageIndex


def backmix(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "backmix", *args], capture_output=True, text=True)


def one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("backmix: error:"), r.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture()
def index(tiny_root) -> ImageIndex:
    return ImageIndex.load(tiny_root)


def build(cache_dir, index):
    torch.manual_seed(0)
    return build_generation(cache_dir, Classifier32(3, width=0.25), index, canvas=40, mean=(0.5,) * 3,
                            std=(0.25,) * 3, num_workers=0, progress=False)


def test_deleted_current_is_refused_by_readers_and_recovered_by_writers(tmp_path, index, caplog):
    cache_dir = tmp_path / "c"
    init_cache(cache_dir, index)
    assert build(cache_dir, index) == 1 and build(cache_dir, index) == 2
    newest = ForegroundCache(cache_dir).maps.copy()
    (cache_dir / "CURRENT").unlink()
    with pytest.raises(BackMixError, match=r"holds generations \[0, 1, 2\] but no CURRENT"):
        ForegroundCache(cache_dir)
    # A writer recovers the newest intact generation instead of restarting at 0 and overwriting gen 1.
    with caplog.at_level("WARNING", logger="backmix"):
        cache = init_cache(cache_dir, index)
    assert cache.generation == 2 and np.array_equal(cache.maps, newest)
    assert "recovered generation 2" in caplog.text
    # The newest file damaged as well: the one before it is taken.
    (cache_dir / "CURRENT").unlink()
    damage(generation_path(cache_dir, 2))
    assert init_cache(cache_dir, index).generation == 1


def damage(path) -> None:
    """Same-size garbage in the middle of the map column (what a bad disk or a stray write does)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = b"\xff" * 64              # 0xffff is a float16 NaN
    path.write_bytes(bytes(data))


def test_a_generation_damaged_in_place_is_refused(tmp_path, index):
    cache_dir = tmp_path / "c"
    init_cache(cache_dir, index)
    damage(generation_path(cache_dir, 0))
    with pytest.raises(BackMixError, match="is damaged: its checksum does not match"):
        ForegroundCache(cache_dir)
    with pytest.raises(BackMixError, match="is damaged"):
        build(cache_dir, index)                    # never carried into the next generation


@pytest.mark.parametrize("bad", [np.nan, 1.5, -0.25])
def test_maps_that_are_not_in_unit_range_are_never_written(tmp_path, bad):
    maps = np.full((4, 8, 8), 0.5, dtype=np.float16)
    maps[2, 3, 3] = bad
    with pytest.raises(BackMixError, match="1 map values are NaN or outside"):
        write_maps(tmp_path / "g.arrow", np.arange(4), np.zeros(4), maps, {})
    assert not list(tmp_path.iterdir())


def test_a_second_build_of_the_same_shard_is_refused_while_one_runs(tmp_path, index):
    cache_dir = tmp_path / "c"
    init_cache(cache_dir, index)
    with build_lock(cache_dir, (0, 1)):            # what a running `backmix cache build` holds
        with pytest.raises(BackMixError, match=r"another build of shard 0/1 .* is running"):
            build(cache_dir, index)
    assert build(cache_dir, index) == 1            # and once it is done, building works


@pytest.mark.parametrize("argv,words", [
    (["cache", "init", "--grid", "0"], ["grid must be a positive"]),
    (["cache", "init", "--cache", "{file}"], ["is a file, not a folder"]),
    (["cache", "info", "--cache", "{file}"], ["is a file, not a folder"]),
    (["cache", "info", "--cache", "{file}/below"], ["is a file, not a folder"]),
])
def test_cache_commands_give_one_line(tmp_path, tiny_root, argv, words):
    afile = tmp_path / "afile"
    afile.write_text("x")
    argv = [a.replace("{file}", str(afile)) for a in argv]
    if "--cache" not in argv:
        argv += ["--cache", str(tmp_path / "new")]
    if argv[1] == "init":
        argv += ["--data", str(tiny_root)]
    one_line_error(backmix(*argv), *words)
    assert not (tmp_path / "new").exists()         # nothing half-made


def test_output_cut_short_by_a_pipe_is_no_traceback(tmp_path, index):
    init_cache(tmp_path / "c", index)
    r = subprocess.run(f"{sys.executable} -m backmix cache info --cache {tmp_path / 'c'} | head -c 1",
                       shell=True, capture_output=True, text=True)
    assert r.stdout and "Traceback" not in r.stderr, r.stderr
