"""Paths that come from what a user gave (an index file's rows, a folder's entries) and may point
elsewhere: a row that leaves the data folder, a link whose target is gone. Each is one line naming it."""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import BackMixError


def check_rows_inside(paths, index_file: Path) -> None:
    """Every row of ``paths`` (an ``IndexPaths``) is relative and stays inside the data folder: an absolute
    row or one with a ``..`` part would read a file the folder does not hold (and say it "does not exist"
    or has "the wrong label" when it is the row that is wrong)."""
    row = first_row_outside(paths)
    if row is not None:
        raise BackMixError(f"{index_file} line {row + 2}: path {paths[row]!r} is outside the data folder "
                           f"{index_file.parent}; the file was edited or is damaged: delete it to re-index")


def first_row_outside(paths) -> Optional[int]:
    """The first row of ``paths`` (an ``IndexPaths``) that is absolute or has a ``..`` part; None if none.

    Byte-wise over the one UTF-8 buffer with numpy, not a regular expression per row (an index file is
    read on every start); '/' and '.' are ASCII, which never occurs inside a multi-byte character."""
    data, offsets = paths.data, paths.offsets
    starts, ends = offsets[:-1], offsets[1:]
    rows = np.flatnonzero(ends > starts)
    absolute = rows[data[starts[rows]] == ord("/")]
    dots = np.flatnonzero(data == ord("."))       # one pass over the bytes; dots are few (one a row, ".jpg")
    pairs = dots[:-1][np.diff(dots) == 1]           # bytes p and p + 1 are '.'
    row = np.searchsorted(offsets, pairs, side="right") - 1
    keep = (row >= 0) & (row < len(starts))
    keep[keep] = pairs[keep] + 2 <= ends[row[keep]]       # both dots in that row
    pairs, row = pairs[keep], row[keep]
    opens = (pairs == starts[row]) | (data[np.maximum(pairs - 1, 0)] == ord("/"))
    closes = (pairs + 2 == ends[row]) | (data[np.minimum(pairs + 2, len(data) - 1)] == ord("/"))
    bad = np.concatenate([absolute, row[opens & closes]])
    return int(bad.min()) if len(bad) else None


def stat_entry(folder_fd: int, folder: Path, name: str) -> os.stat_result:
    """The stat of ``name`` in the open folder, following links; a link to nothing is one line."""
    try:
        return os.stat(name, dir_fd=folder_fd)
    except FileNotFoundError:
        try:
            target = os.readlink(name, dir_fd=folder_fd)
        except OSError:   # not a link: removed while the folder was being indexed
            raise BackMixError(f"{folder / name} disappeared while its folder was indexed") from None
        raise BackMixError(f"{folder / name} is a symbolic link to {target!r}, which does not exist; "
                           "remove the link or restore its target") from None
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise BackMixError(f"{folder / name} is a symbolic link that never reaches a file (a loop of links); "
                           "remove the link") from None


def utf8_names(names: list[str], folder: Path, what: str = "file") -> list[str]:
    """``names`` (a folder's entries, as ``os.listdir`` gives them) when every one is valid UTF-8: an index
    file, a cache and every message hold names as UTF-8 text. A name with other bytes is one line."""
    for name in names:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            shown = os.fsencode(folder / name).decode("utf-8", errors="backslashreplace")
            raise BackMixError(f"{what} name {shown} is not valid UTF-8; rename it") from None
    return names
