"""A ``--regen loop`` rebuild epoch saved part-way: the CAMs recorded so far, kept beside RUN/last.pt.

The recorder takes each image's CAM with the weights of the step that trains on it, so the CAMs
of the steps before a mid-epoch checkpoint cannot be taken again after a resume. Every
``--save-every`` save of such an epoch therefore writes each rank's rows so far to
RUN/in-loop-cams/rank-K-of-N-epoch-E-step-S.arrow (the cache's shard format: Arrow, read by memory
map, its CRC-32 checked) before last.pt, whose part for that rank names the file, its row count and
its CRC ("in_loop"). The torch checkpoint stays small and plain (weights_only); the maps, 164 MB at
ImageNet scale, are a file of their own.

Pairing with last.pt, whatever the moment of a kill: a file's name is unique to its step and it is
complete on disk (written atomically) before the ranks exchange their parts and rank 0 writes
last.pt, so the last.pt on disk always names files that are there and hold what it records. A rank
removes its older files only once they can no longer be named: at a save, every file but the new
one and the one the previous save named (a rank reaches a save only after a collective step that
rank 0 enters once the previous last.pt is written); at a resume, every file but the one last.pt
names; after the epoch's own checkpoint, all of them.
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Callable, Optional

from backmix.osr_data.errors import BackMixError

from .run_files import writing

FOLDER = "in-loop-cams"


class InLoopCams:
    """Rank ``rank`` of ``world``'s recorded CAMs of a rebuild epoch in RUN/in-loop-cams."""

    def __init__(self, run: Path, rank: int, world: int) -> None:
        self.folder = Path(run) / FOLDER
        self.prefix = f"rank-{rank}-of-{world}-"
        self.named: Optional[str] = None     # the file the newest last.pt may name

    def resume(self, recorder, partial: Optional[dict], last: Path) -> None:
        """Give ``recorder`` (just started) the rows that ``partial``, this rank's part of a mid-epoch
        ``last``, names; without one the epoch starts at its first step and no old file is kept."""
        saved = (partial or {}).get("in_loop")
        if partial and not isinstance(saved, dict):
            raise BackMixError(f"{last} was saved part-way through a cache rebuild epoch without its recorded "
                               "CAMs; it cannot be resumed with --regen loop")
        if saved is not None:
            name = saved.get("file")
            if not isinstance(name, str) or not re.fullmatch(re.escape(self.prefix) + r"epoch-\d+-step-\d+\.arrow",
                                                               name):
                raise BackMixError(f"{last} names {name!r} as this rank's recorded CAMs, not a file of "
                                   f"{self.folder}/{self.prefix}epoch-E-step-S.arrow")
            path = self.folder / name
            if not path.is_file():
                raise BackMixError(f"{last} was saved part-way through a cache rebuild epoch, and {path}, the "
                                   "CAMs recorded until then, is missing; the run cannot continue without it")
            recorder.load_rows(path, saved)
            self.named = name
        self.discard(keep=(self.named,))

    def saving(self, recorder, save: Callable[[dict], None]) -> Callable[[dict], None]:
        """``save`` (a mid-epoch checkpoint of this rank's part) with this rank's recorded CAMs written first."""
        def save_with_cams(mine: dict) -> None:
            position = mine["loader"]
            name = f"{self.prefix}epoch-{position['epoch']}-step-{position['step']}.arrow"
            with writing(self.folder / name):
                self.folder.mkdir(exist_ok=True)
                saved = recorder.save_rows(self.folder / name)
            save({**mine, "in_loop": {"file": name, **saved}})
            self.discard(keep=(name, self.named))
            self.named = name
        return save_with_cams

    def discard(self, keep: tuple = ()) -> None:
        """Remove this rank's files (and temporaries a killed write left) but those named in ``keep``."""
        keep = {name for name in keep if name}
        if not self.folder.is_dir():
            return
        for pattern in (f"{self.prefix}epoch-*", f".{self.prefix}epoch-*"):
            for path in self.folder.glob(pattern):
                if path.name not in keep:
                    path.unlink(missing_ok=True)
        if not keep:
            with contextlib.suppress(OSError):   # another rank's files may still be there
                self.folder.rmdir()

    def finish(self) -> None:
        """After the epoch's own checkpoint (every shard staged): no file is needed any more."""
        self.named = None
        self.discard()
