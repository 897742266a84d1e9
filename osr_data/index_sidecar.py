"""``index.arrow``: the columns of ``index.csv`` in an Arrow IPC file beside it, read on later loads.

Reading ``index.csv`` at ImageNet scale (1.28 M rows) costs about a second: parsing, then checking each
row's label against its folder. This binary copy of its columns is read in a small fraction of that.
Its buffers are zstd-compressed (Arrow's IPC compression): a few MiB beside the CSV instead of as
much again, decompressed into memory the way the parsed CSV was, so forked workers share the pages as
before. ``index.csv`` stays the source of truth, the file a person reads and edits; the copy is used
only when it provably is that file's:

- it records the sha256 of the ``index.csv`` bytes it was made from (hashing 62 MiB costs ~0.05 s):
  any edit, whatever its size and mtime, makes it stale;
- it records the index's fingerprint (the sha256 of its columns, which a run computes anyway) and is
  used only when its columns hash to it: a damaged copy is never trusted;
- it holds data only (Arrow's format, no pickle), and its paths pass the same "inside the data folder"
  check as the CSV's rows.

Missing, stale, of another format version, unreadable or damaged: ``read_sidecar`` returns None
(logging one line when damaged) and the caller reads the CSV and writes the copy again.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np

from .index_paths import IndexPaths
from .untrusted_paths import first_row_outside

log = logging.getLogger("backmix")

SIDECAR_NAME = "index.arrow"
FORMAT = "backmix-index/1"     # changed when what the file holds changes: an older copy is rebuilt
META_KEY = b"backmix"
COMPRESSION = "zstd"           # the file's buffers; Arrow's reader decompresses whatever a file says
COLUMNS = ("path", "label", "size", "mtime_ns")


def write_sidecar(index, csv_digest: str) -> None:
    """Write ``index``'s columns beside its index.csv, whose bytes hash to ``csv_digest``."""
    import pyarrow as pa

    from backmix._fs import atomic_file

    meta = {"format": FORMAT, "csv_sha256": csv_digest, "fingerprint": index.fingerprint(),
            "classes": list(index.classes)}
    table = pa.table([index.paths.to_arrow(), pa.array(index.labels), pa.array(index.sizes),
                      pa.array(index.mtimes)], names=list(COLUMNS)).replace_schema_metadata(
        {META_KEY: json.dumps(meta).encode()})
    options = pa.ipc.IpcWriteOptions(compression=COMPRESSION if pa.Codec.is_available(COMPRESSION) else None)
    with atomic_file(index.root / SIDECAR_NAME) as tmp:
        with pa.OSFile(str(tmp), "wb") as f, pa.ipc.new_file(f, table.schema, options=options) as writer:
            writer.write_table(table)


def read_sidecar(root: Path, csv_digest: str, make) -> Optional[object]:
    """The index ``make(root, paths, labels, classes, sizes, mtimes)`` from ``root/index.arrow`` if it
    was made from the index.csv whose bytes hash to ``csv_digest`` and is intact; else None."""
    import pyarrow as pa

    path = root / SIDECAR_NAME
    try:
        meta, batch = _open(path)
    except FileNotFoundError:
        return None
    except (OSError, pa.ArrowException, ValueError, KeyError, TypeError) as e:
        return _damaged(path, str(e).splitlines()[0] if str(e) else type(e).__name__)
    if meta.get("format") != FORMAT or meta.get("csv_sha256") != csv_digest:
        return None      # made by another version, or from another index.csv: read the CSV
    classes = meta.get("classes")
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) and c for c in classes)
            and classes == sorted(set(classes))):
        return _damaged(path, "its class list is not the sorted class names")
    columns = [batch.column(i) for i in range(len(COLUMNS))]
    labels, sizes, mtimes = (c.to_numpy(zero_copy_only=True) for c in columns[1:])
    index = make(root, IndexPaths.from_arrow(columns[0]), labels, tuple(classes), sizes, mtimes)
    if index.fingerprint() != meta.get("fingerprint"):
        return _damaged(path, "its columns do not hash to the fingerprint it records")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        return _damaged(path, "a label is not a class position")
    if first_row_outside(index.paths) is not None:
        return _damaged(path, "a path is outside the data folder")
    return index


def _open(path: Path):
    """(metadata, the one record batch) of the file, its structure fully validated (offsets inside
    their buffers, valid UTF-8) before any value is read."""
    import pyarrow as pa

    reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
    schema = reader.schema
    expected = [pa.large_string(), pa.int64(), pa.int64(), pa.int64()]
    if reader.num_record_batches != 1 or schema.names != list(COLUMNS) or schema.types != expected:
        raise ValueError("not the columns of an index")
    batch = reader.get_batch(0)
    batch.validate(full=True)
    if batch.num_rows == 0 or any(c.null_count for c in batch.columns):
        raise ValueError("no rows, or an empty field")
    meta = json.loads((schema.metadata or {})[META_KEY])
    if not isinstance(meta, dict):
        raise ValueError("no metadata")
    return meta, batch


def _damaged(path: Path, why: str) -> None:
    log.warning("%s is damaged (%s); reading index.csv and writing it again", path, why)
    return None
