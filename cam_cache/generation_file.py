"""One generation (or shard) file of the foreground cache: an Arrow IPC file, read by memory map.

The file holds one record batch with columns ``index`` (int64, the dataset row), ``label`` (int64)
and ``map`` (fixed-size list of g*g float16); the schema metadata names the format, the grid and
what ``store`` records about the generation (its canvas mode among it), and a CRC-32 of the three
columns' bytes, checked when a process first opens the file. Every written map must be finite and in [0, 1].
"""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa

from backmix._fs import atomic_file, fsync_dir
from backmix.osr_data.errors import BackMixError

FORMAT_NAME = "backmix-foreground-cache/"
FORMAT = FORMAT_NAME + "3"


def columns_crc(rows: np.ndarray, labels: np.ndarray, maps: np.ndarray) -> str:
    """CRC-32 of the index, label and map bytes: detects a file damaged in place (not an attacker)."""
    crc = 0
    for a in (rows, labels, maps):
        crc = zlib.crc32(memoryview(np.ascontiguousarray(a)).cast("B"), crc)
    return f"{crc:08x}"



def schema(grid: int, meta: dict[str, object]) -> pa.Schema:
    fields = [pa.field("index", pa.int64()), pa.field("label", pa.int64()),
              pa.field("map", pa.list_(pa.float16(), grid * grid))]
    return pa.schema(fields, metadata={"format": FORMAT, "grid": str(grid),
                                       **{k: str(v) for k, v in meta.items()}})


def write_maps(path: Path, rows: np.ndarray, labels: np.ndarray, maps: np.ndarray,
               meta: dict[str, object]) -> str:
    """Atomically write one Arrow IPC file of ``maps`` (float16 [N, g, g]) for dataset ``rows``; returns
    the CRC-32 its metadata records."""
    n, g, _ = maps.shape
    maps = np.ascontiguousarray(maps, dtype=np.float16)
    rows, labels = np.ascontiguousarray(rows, np.int64), np.ascontiguousarray(labels, np.int64)
    bad = ~((maps >= 0) & (maps <= 1))          # NaN compares false: caught here too
    if bad.any():
        raise BackMixError(f"refusing to write {path}: {int(bad.sum())} map values are NaN or outside [0, 1]")
    flat = pa.array(maps.reshape(-1), type=pa.float16())
    crc = columns_crc(rows, labels, maps)
    batch = pa.record_batch([pa.array(rows, pa.int64()), pa.array(labels, pa.int64()),
                             pa.FixedSizeListArray.from_arrays(flat, g * g)], schema=schema(g, {**meta, "crc32": crc}))
    with atomic_file(path) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
            writer.write_batch(batch)
    fsync_dir(Path(path).parent)
    return crc



class MappedMaps:
    """One generation (or shard) file, memory-mapped: ``maps`` is a zero-copy float16 [N, g, g] view.

    ``verify`` checks the stored CRC-32 (one pass over the file); a process re-opening a file
    its parent already verified (an unpickled cache in a loader worker) skips it."""

    def __init__(self, path: Path, verify: bool = True) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise BackMixError(f"cache file {self.path} does not exist")
        try:
            # The reader must stay alive: the arrays below point into its memory map.
            self._source = pa.memory_map(str(self.path), "r")
            reader = pa.ipc.open_file(self._source)
            if reader.num_record_batches != 1:
                raise ValueError("expected one record batch")
            batch = reader.get_batch(0)
        except (pa.ArrowException, ValueError, OSError) as e:
            raise BackMixError(f"cache file {self.path} is truncated or not an Arrow cache file "
                               f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        meta = {k.decode(): v.decode() for k, v in (batch.schema.metadata or {}).items()}
        written_as = meta.get("format", "")
        if written_as.startswith(FORMAT_NAME) and (written_as != FORMAT or "canvas_mode" not in meta):
            raise BackMixError(f"cache file {self.path} was written by an earlier backmix ({written_as}, "
                               f"{meta.get('canvas_mode', 'no')} canvas mode): delete its cache folder; "
                               "`backmix cache init` rewrites it")
        if written_as != FORMAT or batch.schema.names[:3] != ["index", "label", "map"]:
            raise BackMixError(f"cache file {self.path} was not written by backmix "
                               f"(format {meta.get('format')!r})")
        try:
            self.grid = int(meta["grid"])
        except (KeyError, ValueError):
            raise BackMixError(f"cache file {self.path} names no grid in its metadata") from None
        g2 = self.grid * self.grid
        types = [batch.schema.field(i).type for i in range(3)]
        if (types[0] != pa.int64() or types[1] != pa.int64()
                or types[2] != pa.list_(pa.float16(), g2) or batch.column("map").null_count):
            raise BackMixError(f"cache file {self.path} has columns {', '.join(map(str, types))}, "
                               f"not int64, int64, fixed_size_list<float16>[{g2}]")
        self.meta = meta
        self.canvas_mode = meta["canvas_mode"]
        self.maps = _view(batch.column("map").values, np.float16, len(batch) * g2).reshape(
            len(batch), self.grid, self.grid)
        self.rows = _view(batch.column("index"), np.int64, len(batch))
        self.labels = batch.column("label")
        if verify and "crc32" in meta:
            labels = np.asarray(self.labels, dtype=np.int64)
            if columns_crc(self.rows, labels, self.maps) != meta["crc32"]:
                raise BackMixError(f"cache file {self.path} is damaged: its checksum does not match its "
                                   "contents; delete it (or the cache folder) and rebuild")

    def __len__(self) -> int:
        return len(self.maps)


def _view(array: pa.Array, dtype: type, count: int) -> np.ndarray:
    """Zero copy: a read-only numpy view of a primitive Arrow array's values buffer (the memory map)."""
    if count == 0:
        return np.empty(0, dtype=dtype)
    return np.frombuffer(array.buffers()[1], dtype=dtype, count=count,
                         offset=array.offset * np.dtype(dtype).itemsize)

