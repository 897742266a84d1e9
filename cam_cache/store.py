"""The foreground cache on disk: one Arrow IPC file per generation, read by memory map.

Layout of a cache folder::

    CURRENT                  {"generation": n, "keep": k}: the one generation readers use
    gen-000000.arrow         generation 0 (0.5 everywhere; or no file, see uniform_generation.py), then one a generation
    next-000004/shard-0-of-2.arrow   a build in progress: the shards of generation n+1

Each generation file holds one record batch with columns ``index`` (int64,
the dataset row), ``label`` (int64) and ``map`` (fixed-size list of g*g
float16). Float16
keeps ImageNet's 1.28 M maps of 8 x 8 under 200 MB; the momentum arithmetic
is done in float32 and rounded once per generation. The schema metadata
names the format, generation, base generation, grid, canvas mode (the canvases
the CAMs were taken on), momentum, the digest of
the checkpoint that made it and the fingerprint of the dataset index; a
shard also names the digest of the build's rows and classes, so a restart
reuses only shards of the very same build.

Every file is written to a temporary name, fsync'd and renamed, and CURRENT
moves only after the generation file is in place, so a crash at any moment
leaves the previous generation current and readable. The metadata holds a CRC-32
of the three columns' bytes, checked when a process first opens
the file, and every written map must be finite and in [0, 1]: a file damaged
in place is refused instead of carried into the next generation. A folder
whose CURRENT was deleted is recovered from its newest intact generation by
the writers (``init_cache``), with a log line; readers refuse it.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from pathlib import Path
from typing import Optional

import numpy as np

from backmix._fs import atomic_write_bytes, fsync_dir
from backmix.osr_data.errors import BackMixError
from backmix.osr_data.filelock import refusing_lock
from backmix.osr_data.index import ImageIndex

from .generation_file import MappedMaps, write_maps
from .uniform_generation import UNIFORM_VALUE, UniformGeneration

POINTER = "CURRENT"

log = logging.getLogger("backmix")


def check_grid(grid: int) -> int:
    if not isinstance(grid, int) or grid < 1:
        raise BackMixError(f"grid must be a positive whole number of cells, got {grid}")
    return grid


def check_cache_dir(cache_dir: Path) -> Path:
    """A cache path names a folder: refuse a file in one line (before any work)."""
    cache_dir = Path(cache_dir)
    for parent in (cache_dir, *cache_dir.parents):
        if parent.exists():
            if not parent.is_dir():
                raise BackMixError(f"cache path {cache_dir}: {parent} is a file, not a folder")
            break
    return cache_dir


def generation_path(cache_dir: Path, generation: int) -> Path:
    return Path(cache_dir) / f"gen-{generation:06d}.arrow"


def pending_dir(cache_dir: Path, generation: int) -> Path:
    return Path(cache_dir) / f"next-{generation:06d}"



def generations_on_disk(cache_dir: Path) -> list[int]:
    out = []
    for path in Path(cache_dir).glob("gen-*.arrow"):
        try:
            out.append(int(path.stem.split("-")[1]))
        except (IndexError, ValueError):
            continue
    return sorted(out)


def read_pointer(cache_dir: Path) -> dict:
    path = check_cache_dir(cache_dir) / POINTER
    if not path.is_file():
        if generations_on_disk(cache_dir):
            raise BackMixError(f"{cache_dir} holds generations {generations_on_disk(cache_dir)} but no {POINTER} "
                               "file; `backmix cache init` with the same --data and --cache recovers it "
                               "from the newest intact generation")
        raise BackMixError(f"{cache_dir} is not a foreground cache (no {POINTER} file); "
                           "create one with `backmix cache init` or `backmix cache build`")
    try:
        ptr = json.loads(path.read_text())
        int(ptr["generation"])
    except (ValueError, KeyError, TypeError):
        raise BackMixError(f"{path} is not a backmix cache pointer") from None
    return ptr


def write_pointer(cache_dir: Path, generation: int, keep: int, **extra) -> None:
    atomic_write_bytes(Path(cache_dir) / POINTER,
                       json.dumps({"generation": generation, "keep": keep, **extra}).encode())
    fsync_dir(Path(cache_dir))


class ForegroundCache:
    """The current generation of a cache folder, as ``ForegroundMaps`` for the loaders.

    ``index``, ``grid`` and ``canvas_mode``, when given, are checked against the file: a
    cache is never used with another data set, grid or canvas mode. Pickles as its folder and
    expectations, and reopens its memory map on the other side (loader workers).
    """

    def __init__(self, cache_dir: str | os.PathLike, *, index: Optional[ImageIndex] = None,
                 grid: Optional[int] = None, canvas_mode: Optional[str] = None) -> None:
        self.cache_dir = Path(cache_dir)
        self._canvas_mode = canvas_mode
        self._fingerprint = index.fingerprint() if index is not None else None
        self._rows = len(index) if index is not None else None
        self._grid = grid
        self._pointer_stat: Optional[tuple] = None
        self._open(self._read_generation())

    def _read_generation(self) -> int:
        self._pointer_stat = _stat_key(self.cache_dir / POINTER)
        ptr = read_pointer(self.cache_dir)
        self._uniform = ptr.get("uniform")     # generation 0 without a file (cam_cache/uniform_generation.py)
        return int(ptr["generation"])

    def _open(self, generation: int, verify: bool = True) -> None:
        mapped = UniformGeneration(self.cache_dir / POINTER, self._uniform) if generation == 0 and self._uniform \
            else MappedMaps(generation_path(self.cache_dir, generation), verify=verify)
        if self._grid is not None and mapped.grid != self._grid:
            raise BackMixError(f"cache file {mapped.path} has {mapped.grid}x{mapped.grid} maps, "
                               f"expected {self._grid}x{self._grid}")
        if self._canvas_mode is not None and mapped.canvas_mode != self._canvas_mode:
            raise BackMixError(f"cache file {mapped.path} holds maps of {mapped.canvas_mode!r} canvases, "
                               f"expected {self._canvas_mode!r} (--canvas-mode)")
        if self._fingerprint is not None and mapped.meta.get("dataset") != self._fingerprint:
            raise BackMixError(f"cache file {mapped.path} was built for another data set (index fingerprint "
                               f"{mapped.meta.get('dataset', '?')[:12]}, this one {self._fingerprint[:12]})")
        if self._rows is not None and len(mapped) != self._rows:
            raise BackMixError(f"cache file {mapped.path} has {len(mapped)} rows, the data set {self._rows}")
        self._mapped, self.generation, self.grid, self._length = mapped, generation, mapped.grid, len(mapped)

    def _file(self) -> MappedMaps:
        if self._mapped is None:      # unpickled: reopen the generation the parent verified
            self._open(self.generation, verify=False)
        return self._mapped

    @property
    def meta(self) -> dict:
        return self._file().meta

    @property
    def canvas_mode(self) -> str:
        """The canvas mode the maps were made on (``osr_data.decode.CANVAS_MODES``); loaders check it."""
        return self._file().canvas_mode

    @property
    def maps(self) -> np.ndarray:
        """float16 [N, g, g], a read-only view of the memory map."""
        return self._file().maps

    @property
    def rows(self) -> np.ndarray:
        """int64 [N]: the dataset row of each map (0..N-1 in a generation file)."""
        return self._file().rows

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self._file().labels, dtype=np.int64)

    def __len__(self) -> int:
        return self._length

    def gather(self, indices: np.ndarray) -> np.ndarray:
        """float32 [B, g, g]: one fancy index into the memory map (only the touched pages are read)."""
        return self._file().maps[np.asarray(indices, dtype=np.int64)].astype(np.float32)

    def refresh(self) -> bool:
        """Switch to the generation CURRENT names, if it changed. CURRENT is replaced by rename, so an
        unchanged (inode, mtime, size) means an unchanged pointer: one stat, no read, in the common case."""
        if _stat_key(self.cache_dir / POINTER) == self._pointer_stat and self._mapped is not None:
            return False
        generation = self._read_generation()
        changed = generation != self.generation
        if changed or self._mapped is None:
            self._open(generation)
        return changed

    def __getstate__(self) -> dict:
        # The folder, the expectations and the generation in use; never the memory map.
        state = dict(self.__dict__)
        state["_mapped"], state["_pointer_stat"] = None, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


def _stat_key(path: Path) -> Optional[tuple]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def init_cache(cache_dir: str | os.PathLike, index: ImageIndex, *, grid: int = 8,
               keep: int = 3, canvas_mode: str = "center") -> ForegroundCache:
    """Generation 0 (0.5 everywhere) for ``index`` on ``canvas_mode`` canvases, written as a file; the
    existing cache when there is one for it (refused if it is of another grid or canvas mode)."""
    return _open_or_start(cache_dir, index, grid, keep, canvas_mode, write_generation_0=True)


def start_cache(cache_dir: str | os.PathLike, index: ImageIndex, *, grid: int = 8, keep: int = 3,
                canvas_mode: str = "center") -> ForegroundCache:
    """As ``init_cache``, but a new cache's generation 0 is uniform and has no file: CURRENT alone names
    it (instant at any size; ``uniform_generation.py``)."""
    return _open_or_start(cache_dir, index, grid, keep, canvas_mode, write_generation_0=False)


def _open_or_start(cache_dir: str | os.PathLike, index: ImageIndex, grid: int, keep: int, canvas_mode: str, *,
                   write_generation_0: bool) -> ForegroundCache:
    from backmix.osr_data.decode import check_canvas_mode
    check_canvas_mode(canvas_mode)
    cache_dir = check_cache_dir(cache_dir)
    check_grid(grid)
    if keep < 1:
        raise BackMixError(f"keep must be at least 1, got {keep}")
    if not (cache_dir / POINTER).exists() and generations_on_disk(cache_dir):
        recover_pointer(cache_dir, keep)
    if (cache_dir / POINTER).exists():
        return ForegroundCache(cache_dir, index=index, grid=grid, canvas_mode=canvas_mode)
    make_cache_folder(cache_dir)
    if write_generation_0:
        n = len(index)
        write_maps(generation_path(cache_dir, 0), np.arange(n), index.labels,
                   np.full((n, grid, grid), UNIFORM_VALUE, dtype=np.float16),
                   {"generation": 0, "momentum": 0.0, "checkpoint": "", "dataset": index.fingerprint(),
                    "canvas_mode": canvas_mode})
        write_pointer(cache_dir, 0, keep)
    else:
        write_pointer(cache_dir, 0, keep, uniform={"grid": grid, "rows": len(index), "canvas_mode": canvas_mode,
                                                   "dataset": index.fingerprint(),
                                                   "index": str(Path(index.root).resolve())})
    return ForegroundCache(cache_dir, index=index, grid=grid, canvas_mode=canvas_mode)


def recover_pointer(cache_dir: Path, keep: int) -> int:
    """Write CURRENT for the newest generation file that opens and checks out; a build would
    otherwise restart at generation 0 and overwrite the newer files."""
    with publish_lock(cache_dir):
        if (cache_dir / POINTER).exists():
            return int(read_pointer(cache_dir)["generation"])
        for generation in reversed(generations_on_disk(cache_dir)):
            try:
                MappedMaps(generation_path(cache_dir, generation))
            except BackMixError as e:
                log.warning("%s", e)
                continue
            write_pointer(cache_dir, generation, keep)
            log.warning("%s had no %s file: recovered generation %d, the newest intact one",
                        cache_dir, POINTER, generation)
            return generation
    raise BackMixError(f"{cache_dir} has no {POINTER} file and none of its generation files is intact; "
                       "delete the folder and start again")


def make_cache_folder(cache_dir: Path) -> None:
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BackMixError(f"cannot create cache folder {cache_dir}: {e.strerror}") from None


@contextlib.contextmanager
def publish_lock(cache_dir: Path):
    """One publisher at a time; flock is released by the kernel if the process dies."""
    with open(Path(cache_dir) / ".publish.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def build_lock(cache_dir: Path, shard: tuple[int, int]):
    """Held while one process builds shard k/N: a second build of the same shard is refused in one
    line instead of racing the first to the publish and losing its files."""
    k, n = shard
    path = Path(cache_dir) / f".build-{k}-of-{n}.lock"
    with refusing_lock(path, f"another build of shard {k}/{n} of {cache_dir} is running (it holds {path}); "
                             "wait for it to finish, then run again if you need one more generation"):
        yield


def prune(cache_dir: Path, current: int, keep: int) -> list[Path]:
    """Delete generation files older than the ``keep`` newest, and what a killed process left behind
    (temporary files of generation files, pending folders of published generations); return the
    deleted paths. Call it holding the publish lock: only the publisher writes these names."""
    import shutil
    gone = []
    cache_dir = Path(cache_dir)
    for path in sorted(cache_dir.glob("gen-*.arrow")):
        try:
            g = int(path.stem.split("-")[1])
        except (IndexError, ValueError):
            continue
        if g <= current - keep:
            path.unlink(missing_ok=True)
            gone.append(path)
    for pattern in (".gen-*.arrow.tmp-*", f".{POINTER}.tmp-*"):
        for path in cache_dir.glob(pattern):
            path.unlink(missing_ok=True)
            gone.append(path)
    for path in cache_dir.glob("next-*"):
        try:
            stale = int(path.name.split("-")[1]) <= current
        except (IndexError, ValueError):
            continue
        if stale and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            gone.append(path)
    return gone


def cache_info(cache_dir: str | os.PathLike) -> dict:
    cache = ForegroundCache(check_cache_dir(cache_dir))
    files = sorted(Path(cache_dir).glob("gen-*.arrow"))
    return {"cache": str(cache_dir), "format": cache.meta.get("format", ""), "generation": cache.generation,
            "rows": len(cache), "grid": cache.grid, "canvas_mode": cache.canvas_mode,
            "momentum": float(cache.meta.get("momentum", 0)), "checkpoint": cache.meta.get("checkpoint", ""),
            "dataset": cache.meta.get("dataset", ""), "keep": int(read_pointer(cache_dir).get("keep", 3)),
            "generations_on_disk": [int(p.stem.split("-")[1]) for p in files],
            "pending_shards": sorted(p.name for p in pending_dir(cache_dir, cache.generation + 1)
                                     .glob("shard-*-of-*.arrow")),
            "bytes_on_disk": sum(p.stat().st_size for p in Path(cache_dir).rglob("*") if p.is_file())}
