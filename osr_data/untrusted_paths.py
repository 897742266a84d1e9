"""Paths that come from what a user gave (an index file's rows, a folder's entries) and may point
elsewhere: a row that leaves the data folder, a link whose target is gone. Each is one line naming it."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import BackMixError


def check_rows_inside(paths, index_file: Path) -> None:
    """Every row of the pyarrow strings ``paths`` is relative and stays inside the data folder: an absolute
    row or one with a ``..`` part would read a file the folder does not hold (and say it "does not exist"
    or has "the wrong label" when it is the row that is wrong)."""
    import pyarrow.compute as pc
    outside = pc.or_(pc.starts_with(paths, "/"), pc.match_substring_regex(paths, r"(^|/)\.\.(/|$)"))
    if pc.any(outside).as_py():
        row = int(np.flatnonzero(outside.to_numpy(zero_copy_only=False))[0])
        raise BackMixError(f"{index_file} line {row + 2}: path {paths[row].as_py()!r} is outside the data folder "
                           f"{index_file.parent}; the file was edited or is damaged: delete it to re-index")


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
