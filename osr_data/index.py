"""Image folders in the ImageNet layout and their index file.

A split folder looks like ``root/<class>/<image>.jpg``. Its index file
``root/index.csv`` lists ``path,label,size,mtime_ns`` (path relative to
``root``; size and modification time as the file had them when it was indexed)
in a fixed order: the row number is the image's *dataset index*, the key every
other stage (cache rows, sampler, loaders) uses. Labels are the positions of
the class folder names in sorted order.

At ImageNet scale (1.28 M rows) the index is held as columns, not Python
objects: one UTF-8 buffer of all paths with int64 offsets, and int64 labels,
sizes and times. It loads with pyarrow's CSV reader without building a string
per row, and forked DataLoader workers read it without writing to its pages
(no per-object reference counts), so the pages stay shared.
Beside it, ``index.arrow`` holds the same columns in binary form: made from
exactly the bytes of index.csv, it is read in a fraction of the CSV's time on
later loads (``index_sidecar``: compressed, decompressed into memory); index.csv remains the file that is read and edited.

Size and mtime make the fingerprint tell apart two data sets with the same file
names (as ``make`` does, no content hashing); ``checked_path`` compares them to
the file when a loader reads it, so a file overwritten after indexing stops the
run instead of silently feeding data the cache and betons were not made for.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import os
import re
import stat
from pathlib import Path
from typing import Optional

import numpy as np

from backmix._fs import atomic_write_bytes

from .errors import BackMixError
from .index_paths import IndexPaths
from .file_digest import file_digest
from .index_sidecar import read_sidecar, write_sidecar
from .untrusted_paths import check_rows_inside, stat_entry, utf8_names

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
INDEX_NAME = "index.csv"
COLUMNS = ("path", "label", "size", "mtime_ns")


class ImageIndex:
    """The ordered (path, label, size, mtime) rows of one split folder, held as columns."""

    def __init__(self, root: str | os.PathLike, paths: IndexPaths, labels: np.ndarray, classes: tuple[str, ...],
                 sizes: np.ndarray, mtimes: np.ndarray) -> None:
        self.root = Path(root)
        self.paths = paths
        self.labels = labels      # int64 [N]
        self.classes = classes
        self.sizes = sizes        # int64 [N], bytes when indexed
        self.mtimes = mtimes      # int64 [N], st_mtime_ns when indexed
        self._fingerprint: Optional[str] = None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def abspath(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i])

    def checked_path(self, i: int) -> str:
        """``abspath(i)`` after checking the file is still the one indexed (same size and mtime)."""
        path = self.abspath(i)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise _listed_but_missing(path, self.root / INDEX_NAME) from None
        if st.st_size != self.sizes[i] or st.st_mtime_ns != self.mtimes[i]:
            raise BackMixError(f"image {path} changed after {self.root / INDEX_NAME} was written (size or mtime "
                               "differ), so caches and betons made for this data set no longer match it; "
                               "delete the index file to re-index")
        return path

    def first_changed(self, rows: np.ndarray) -> Optional[int]:
        """The first of ``rows`` whose file is gone or no longer the one indexed (size or mtime), or None:
        what ``checked_path`` checks at each read, for a reader that never opens the files (a beton)."""
        for i in np.asarray(rows, dtype=np.int64).tolist():
            try:
                st = os.stat(self.abspath(i))
            except FileNotFoundError:
                return i
            if st.st_size != self.sizes[i] or st.st_mtime_ns != self.mtimes[i]:
                return i
        return None

    # --- building ----------------------------------------------------------------------------------

    @classmethod
    def scan(cls, root: str | os.PathLike) -> "ImageIndex":
        """Index ``root/<class>/<image>`` in sorted order (classes, then file names); one stat per file."""
        root = Path(root)
        _check_is_split_folder(root)
        classes = _class_folders(root)
        if not classes:
            raise BackMixError(f"data folder {root} is empty: expected images in {root}/<class>/<image>.jpg")
        paths: list[str] = []
        labels, sizes, mtimes = [], [], []
        for label, name in enumerate(classes):
            folder = os.open(root / name, os.O_RDONLY | os.O_DIRECTORY)
            try:
                for file in _image_names(root, name):
                    st = stat_entry(folder, root / name, file)   # relative to the open folder: no path walk
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    paths.append(f"{name}/{file}")
                    sizes.append(st.st_size)
                    mtimes.append(st.st_mtime_ns)
                    labels.append(label)
            finally:
                os.close(folder)
            if not labels or labels[-1] != label:
                raise _no_images(root / name)
        return cls(root, IndexPaths.from_strings(paths), np.asarray(labels, dtype=np.int64), tuple(classes),
                   np.asarray(sizes, dtype=np.int64), np.asarray(mtimes, dtype=np.int64))

    @classmethod
    def load(cls, root: str | os.PathLike) -> "ImageIndex":
        """Read ``root/index.csv``; scan the folder (and write the index) when there is none.

        The rows come from the binary copy beside it (``index_sidecar``) when that was made from
        these very bytes and is intact; else from the CSV, and the copy is written again. Loading
        then checks, with one directory listing per class (no stat), that every listed file exists
        and that no class folder or image appeared after the index was written."""
        root = Path(root)
        _check_is_split_folder(root)
        index_file = root / INDEX_NAME
        if not index_file.exists():
            index = cls.scan(root)
            with contextlib.suppress(OSError):   # a read-only data set is fine: the scan is deterministic
                index.write()
            return index
        if not index_file.is_file():
            raise BackMixError(f"{index_file} is not a file (a folder of that name?): move it out of {root}; "
                               f"the index is written there")
        index = read_sidecar(root, file_digest(index_file), cls)
        if index is None:
            text = index_file.read_bytes()       # parsed and hashed once: the copy is of exactly these
            index = cls._read(root, index_file, text)
            with contextlib.suppress(OSError):   # a read-only data set reads its CSV every time
                write_sidecar(index, hashlib.sha256(text).hexdigest())
            import pyarrow as pa
            pa.default_memory_pool().release_unused()    # the parser's and the check's buffers, not the index's
        index._check_folders(index_file)
        return index

    @classmethod
    def _read(cls, root: Path, index_file: Path, text: bytes) -> "ImageIndex":
        """The index in ``text``, the bytes of ``index_file``."""
        import pyarrow as pa
        from pyarrow import csv as pacsv

        first = io.TextIOWrapper(io.BytesIO(text), newline="", errors="replace").readline()   # not UTF-8: no index
        header = next(csv.reader([first]), [])
        if tuple(header) == ("path", "label"):   # before sizes and mtimes were recorded
            raise BackMixError(f"{index_file} was written by an earlier backmix (no size and mtime columns): "
                               "delete it; the next `backmix` command that reads the folder rewrites it")
        if tuple(header) != COLUMNS:
            raise BackMixError(f"{index_file} is not an index file (expected header '{','.join(COLUMNS)}')")
        types = {"path": pa.large_string(), "label": pa.int64(), "size": pa.int64(), "mtime_ns": pa.int64()}
        try:
            table = pacsv.read_csv(pa.BufferReader(text), convert_options=pacsv.ConvertOptions(
                column_types={c: types[c] for c in header}, include_columns=header))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise BackMixError(f"{index_file} has a malformed row: {str(e).splitlines()[0]}") from None
        if table.num_rows == 0:
            raise BackMixError(f"{index_file} lists no images")
        columns = {c: table.column(c).combine_chunks() for c in header}
        if any(a.null_count for a in columns.values()):
            raise BackMixError(f"{index_file} has a malformed row: an empty field")
        path_array = columns["path"]
        paths = IndexPaths.from_arrow(path_array)
        labels = columns["label"].to_numpy()
        classes = _classes_of_rows(path_array, paths, labels, index_file)
        return cls(root, paths, labels, classes, columns["size"].to_numpy(), columns["mtime_ns"].to_numpy())

    def _check_folders(self, index_file: Path) -> None:
        """Every listed file exists; no class folder or image is newer than the index. One listing per
        folder whose mtime is not older than the index file, and no stat of a file: at 1.28 M files a
        stat each would cost seconds on every load."""
        known = set(self.classes)
        for name in _class_folders(self.root):
            if name not in known:
                if not _image_names(self.root, name):
                    raise _no_images(self.root / name)
                raise _written_before(index_file, f"{name}/")
        if not self._folders_changed_since(index_file):
            return
        import pyarrow as pa          # only now: importing pyarrow.compute is a noticeable part of a start
        import pyarrow.compute as pc

        listings = []   # arrow arrays: the Python strings of one folder at a time are freed at once
        for name in self.classes:
            try:
                listings.append(_listing(self.root / name))
            except (FileNotFoundError, NotADirectoryError):
                raise BackMixError(f"class folder {self.root / name} listed in {index_file} does not exist; "
                                   "delete the index file to re-index") from None
        # The folders' image paths in index order (class, then name) as one arrow array: equal to the
        # index's paths in one comparison. Only when they differ are the rows looked up one by one.
        names = pa.concat_arrays(listings)
        labels = pa.array(np.repeat(np.arange(self.num_classes), [len(x) for x in listings]))
        del listings
        on_disk = pa.table({"label": labels, "name": names}).filter(_image_mask(names))
        on_disk = on_disk.take(pc.sort_indices(on_disk, sort_keys=[("label", "ascending"), ("name", "ascending")]))
        prefixes = pa.array([f"{name}/" for name in self.classes], pa.large_string()).take(on_disk["label"])
        on_disk = pc.binary_join_element_wise(prefixes, on_disk["name"], pa.scalar("", pa.large_string()))
        listed = self.paths.to_arrow()
        if listed.equals(on_disk.combine_chunks()):
            return
        missing = pc.invert(pc.is_in(listed, value_set=on_disk))
        if pc.any(missing).as_py():
            raise _listed_but_missing(self.abspath(pc.index(missing, True).as_py()), index_file)
        for path in on_disk.filter(pc.invert(pc.is_in(on_disk, value_set=listed))).to_pylist():
            if (self.root / path).is_file():          # not a folder named like an image
                raise _written_before(index_file, path)

    def _folders_changed_since(self, index_file: Path) -> bool:
        """Whether any class folder's entries may have changed after the index was written: adding,
        removing or renaming a file sets its folder's mtime, so folders all older than the index file
        need no listing (a stat a folder, not a listing: 1,000 stats instead of 1.28 M names)."""
        written = index_file.stat().st_mtime_ns
        try:
            return any(os.stat(self.root / name).st_mtime_ns >= written for name in self.classes)
        except OSError:   # a class folder gone: the listing names it
            return True

    # --- writing and identity ----------------------------------------------------------------------

    def to_csv_bytes(self) -> bytes:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(COLUMNS)
        w.writerows(zip(self.paths.to_arrow().to_pylist(), self.labels.tolist(), self.sizes.tolist(),
                        self.mtimes.tolist()))
        return buf.getvalue().encode()

    def write(self) -> Path:
        """index.csv, then its binary copy (index_sidecar), which a full disk or a read-only folder only
        leaves out: the next load reads the CSV."""
        path = self.root / INDEX_NAME
        text = self.to_csv_bytes()
        atomic_write_bytes(path, text)
        with contextlib.suppress(OSError):
            write_sidecar(self, hashlib.sha256(text).hexdigest())
        return path

    def fingerprint(self) -> str:
        """sha256 of the rows (paths, labels, sizes, mtimes): names the data set a cache or beton was made
        for. Computed once per index."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for column in (self.paths.offsets - self.paths.offsets[0],
                           self.paths.data[self.paths.offsets[0]:self.paths.offsets[-1]],
                           self.labels, self.sizes, self.mtimes):
                h.update(np.ascontiguousarray(column).astype(column.dtype.newbyteorder("<"), copy=False).data)
            self._fingerprint = h.hexdigest()
        return self._fingerprint


def train_folder(data: str | os.PathLike) -> Path:
    """The image folder ``data`` names for training: a prepared root's train/ (what ``backmix data
    prepare`` writes), else ``data`` itself."""
    data = Path(data)
    return data / "train" if (data / "train").is_dir() else data


def _check_is_split_folder(root: Path) -> None:
    if not root.is_dir():
        raise BackMixError(f"data folder {root} does not exist")
    if (root / "train").is_dir() and (root / "test").is_dir() and not (root / INDEX_NAME).exists():
        raise BackMixError(f"{root} holds train/ and test/: pass {root / 'train'}")


def _class_folders(root: Path) -> list[str]:
    """Sorted names of the class folders (hidden ones, such as .backmix, are not classes)."""
    with os.scandir(root) as it:
        return sorted(utf8_names([e.name for e in it if e.is_dir() and not e.name.startswith(".")], root,
                                 "class folder"))


def _image_mask(names):
    """Which of the pyarrow strings ``names`` end in an image suffix (any case)."""
    import pyarrow.compute as pc
    suffix = "(" + "|".join(re.escape(s) for s in IMAGE_SUFFIXES) + ")$"
    return pc.match_substring_regex(names, suffix, ignore_case=True)


def _image_names(root: Path, name: str) -> list[str]:
    """Sorted names in class folder ``name`` with an image suffix: one listing, no stat."""
    names = _listing(root / name)
    return sorted(names.filter(_image_mask(names)).to_pylist())


def _listing(folder: Path):
    """The names in ``folder`` as a pyarrow string array; one that is not UTF-8 is refused in one line."""
    import pyarrow as pa
    names = os.listdir(folder)
    try:
        return pa.array(names, pa.large_string())
    except UnicodeEncodeError:   # arrow strings are UTF-8: the name that is not is found and named
        utf8_names(names, folder)
        raise


def _listed_but_missing(path: str, index_file: Path) -> BackMixError:
    return BackMixError(f"image {path} is listed in {index_file} but does not exist; "
                        "delete the index file to re-index")


def _written_before(index_file: Path, what: str) -> BackMixError:
    return BackMixError(f"{index_file} was written before {what} appeared; delete it to re-index")


def _no_images(folder: Path) -> BackMixError:
    """A class folder without images is refused: it would be a class nothing can be learnt of."""
    return BackMixError(f"class folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}): "
                        "add some or remove the folder")


def _classes_of_rows(paths, columns: IndexPaths, labels: np.ndarray, index_file: Path) -> tuple[str, ...]:
    """The class folder names, checking every row's label is its folder's position in sorted order
    (``paths``: the pyarrow strings, ``columns`` the same rows as ``IndexPaths``)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    check_rows_inside(columns, index_file)
    no_folder = pc.invert(pc.match_substring(paths, "/"))
    if pc.any(no_folder).as_py():
        row = int(np.flatnonzero(no_folder.to_numpy(zero_copy_only=False))[0])
        raise BackMixError(f"{index_file} line {row + 2}: path {paths[row].as_py()!r} names no class folder")
    folders = pc.list_element(pc.split_pattern(paths, "/", max_splits=1), 0)
    classes = tuple(sorted(pc.unique(folders).to_pylist()))
    position = pc.index_in(folders, value_set=pa.array(classes, pa.large_string())).to_numpy()
    wrong = np.flatnonzero(position != labels)
    if len(wrong):
        row = int(wrong[0])
        raise BackMixError(f"{index_file} line {row + 2}: {paths[row].as_py()} has label {labels[row]}, but its "
                           f"folder {classes[position[row]]}/ is class {position[row]} (the class folders in "
                           "sorted order); the file was edited or is damaged: delete it to re-index")
    return classes
