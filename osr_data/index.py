"""Image folders in the ImageNet layout and their index file.

A split folder looks like ``root/<class>/<image>.jpg``. Its index file
``root/index.csv`` lists ``path,label`` (path relative to ``root``) in a fixed
order: the row number is the image's *dataset index*, the key every other stage
(cache rows, sampler, loaders) uses. Labels are the positions of the class
folder names in sorted order.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import BackMixError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
INDEX_NAME = "index.csv"


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary name beside ``path`` for the block to write; then fsyncs it and renames it
    onto ``path``, so readers never see half a file. If the block raises, the temporary file goes."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


@dataclass(frozen=True)
class ImageIndex:
    """The ordered list of (path, label) of one split folder."""

    root: Path
    paths: tuple[str, ...]
    labels: np.ndarray  # int64 [N]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def abspath(self, i: int) -> str:
        return str(self.root / self.paths[i])

    @classmethod
    def scan(cls, root: str | os.PathLike) -> "ImageIndex":
        """Index ``root/<class>/<image>`` in sorted order (classes, then file names)."""
        root = Path(root)
        if not root.is_dir():
            raise BackMixError(f"data folder {root} does not exist")
        classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        paths: list[str] = []
        labels: list[int] = []
        for label, name in enumerate(classes):
            files = sorted(
                f.name for f in (root / name).iterdir()
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
            )
            paths += [f"{name}/{f}" for f in files]
            labels += [label] * len(files)
        if not paths:
            raise BackMixError(
                f"data folder {root} is empty: expected images in {root}/<class>/<image>.jpg"
            )
        return cls(root, tuple(paths), np.asarray(labels, dtype=np.int64), tuple(classes))

    @classmethod
    def load(cls, root: str | os.PathLike) -> "ImageIndex":
        """Read ``root/index.csv``; scan the folder (and write the index) when there is none."""
        root = Path(root)
        if not root.is_dir():
            raise BackMixError(f"data folder {root} does not exist")
        index_file = root / INDEX_NAME
        if not index_file.exists():
            index = cls.scan(root)
            try:
                index.write()
            except OSError:  # a read-only data set is fine: the scan is deterministic
                pass
            return index
        with open(index_file, newline="") as f:
            rows = list(csv.reader(f))
        if not rows or rows[0] != ["path", "label"]:
            raise BackMixError(f"{index_file} is not an index file (expected header 'path,label')")
        rows = rows[1:]
        if not rows:
            raise BackMixError(f"{index_file} lists no images")
        try:
            paths = tuple(r[0] for r in rows)
            labels = np.asarray([int(r[1]) for r in rows], dtype=np.int64)
        except (IndexError, ValueError):
            raise BackMixError(f"{index_file} has a malformed row") from None
        classes_by_label: dict[int, str] = {}
        for p, lab in zip(paths, labels.tolist()):
            classes_by_label.setdefault(lab, p.split("/", 1)[0])
        if sorted(classes_by_label) != list(range(len(classes_by_label))):
            raise BackMixError(f"{index_file}: labels must be 0..C-1 without gaps")
        classes = tuple(classes_by_label[i] for i in range(len(classes_by_label)))
        return cls(root, paths, labels, classes)

    def to_csv_bytes(self) -> bytes:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path", "label"])
        w.writerows(zip(self.paths, self.labels.tolist()))
        return buf.getvalue().encode()

    def write(self) -> Path:
        path = self.root / INDEX_NAME
        atomic_write_bytes(path, self.to_csv_bytes())
        return path

    def fingerprint(self) -> str:
        """sha256 of the index contents: names the data set a cache was built for."""
        return hashlib.sha256(self.to_csv_bytes()).hexdigest()

    def subset_mask(self, known_labels: np.ndarray) -> np.ndarray:
        return np.isin(self.labels, known_labels)
