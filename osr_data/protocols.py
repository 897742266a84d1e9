"""Published open-set splits: ``--splits FILE`` and ``--protocol NAME``.

A splits file is JSON: a list with one entry per split, each either a list of
known class names (every other class of the folder is unknown) or
``{"known": [...], "unknown": [...]}`` (then the folder must hold exactly those
classes). ``protocols.json`` beside this module ships the five splits of CIFAR10,
CIFAR+10, CIFAR+50 and TinyImageNet of Neal et al. 2018 as ARPL publishes them, written as
class names (its ``source`` fields say how); ``--protocol NAME`` picks one of them,
and refuses a folder whose classes are not the protocol's. The Semantic Shift Benchmark's
protocols (``ssb.py``) have one split, every known class, and check the ``--open-test`` folders
named after their published unknown sets.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import BackMixError
from .limits import MAX_SPLITS_BYTES, read_bounded
from .splits import ALL, OpenSetSplit, split_number
from .ssb import SSB_PROTOCOLS, ssb_lists

PROTOCOLS_FILE = Path(__file__).with_name("protocols.json")
PROTOCOLS = ("cifar10", "cifar+10", "cifar+50", "tinyimagenet") + SSB_PROTOCOLS


def _names(names: list[str], most: int = 4) -> str:
    shown = ", ".join(map(repr, names[:most]))
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def _mismatch(want: tuple[str, ...], have: tuple[str, ...]) -> str:
    """"missing A, B; not in it C": how the classes ``have`` differ from ``want`` ("" when they do not)."""
    wanted, held = set(want), set(have)
    missing = [c for c in want if c not in held]
    extra = [c for c in have if c not in wanted]
    return "; ".join(part for part in (f"missing {_names(missing)}" if missing else "",
                                       f"not in it {_names(extra)}" if extra else "") if part)


@dataclass(frozen=True)
class SplitList:
    """The known (and, where given, unknown) class names of each split, and where they came from."""
    source: str                                   # "--protocol cifar10" or "--splits FILE", for messages
    entries: tuple[tuple[tuple[str, ...], Optional[tuple[str, ...]]], ...]
    classes: Optional[tuple[str, ...]] = None     # a protocol's whole class list: the folder must equal it
    every_known: bool = False                     # one split, every class known: --split all (or 0)
    # published sets of unknowns, by the --open-test folder name that stands for each ("easy", "hard")
    open_sets: dict = field(default_factory=dict)

    def resolve(self, classes: tuple[str, ...], split: str) -> OpenSetSplit:
        """Split number ``split`` (or ``all``: every class known) on a folder with ``classes``; one line when
        they do not match."""
        spec = str(split).strip()
        if spec == ALL or self.every_known:
            if self.every_known and spec not in (ALL, "0"):
                raise BackMixError(f"{self.source} trains on every known class, with the unknowns from its "
                                   f"--open-test folders: --split all, not {split!r}")
            if self.classes is not None and set(self.classes) != set(classes):
                raise BackMixError(f"the folder's classes do not match {self.source} split {spec}: "
                                   + _mismatch(self.classes, classes))
            return OpenSetSplit(tuple(classes), ())
        k = split_number(split)
        if k is None or k >= len(self.entries):
            raise BackMixError(f"with {self.source}, --split is a split number 0..{len(self.entries) - 1}, "
                               f"not {split!r}")
        known, unknown = self.entries[k]
        want = self.classes or (known + unknown if unknown is not None else None)
        if want is not None and set(want) != set(classes):
            raise BackMixError(f"the folder's classes do not match {self.source} split {split}: "
                               + _mismatch(want, classes))
        missing = [c for c in known if c not in classes]
        if missing:
            raise BackMixError(f"the folder's classes do not match {self.source} split {split}: "
                               f"missing {_names(missing)}")
        return OpenSetSplit(tuple(c for c in classes if c in known), tuple(c for c in classes if c not in known))

    def check_open_set(self, name: str, folder: str, classes: tuple[str, ...]) -> None:
        """An --open-test folder reported as ``name`` ("easy", or "easy/test" for DIR/easy/test) that stands for
        one of the published sets of unknowns must hold exactly that set's classes: one line when not."""
        key = name.split("/")[0].lower()
        want = self.open_sets.get(key)
        if want is not None and set(want) != set(classes):
            raise BackMixError(f"--open-test {folder} does not hold the {key} unknowns of {self.source}: "
                               + _mismatch(want, classes))


def _entries(data, where: str) -> tuple:
    if not isinstance(data, list) or not data:
        raise BackMixError(f"{where} must hold a JSON list of splits (each a list of known class names)")
    out = []
    for k, entry in enumerate(data):
        known, unknown = (entry.get("known"), entry.get("unknown")) if isinstance(entry, dict) else (entry, None)
        for part in (known,) + ((unknown,) if unknown is not None else ()):
            if not isinstance(part, list) or not part or not all(isinstance(c, str) for c in part) \
                    or len(set(part)) != len(part):
                raise BackMixError(f"{where}: split {k} must be a list of distinct class names "
                                   "or {\"known\": [...], \"unknown\": [...]}")
        if unknown is not None and set(known) & set(unknown):
            raise BackMixError(f"{where}: split {k} names {sorted(set(known) & set(unknown))[0]!r} known and unknown")
        out.append((tuple(known), tuple(unknown) if unknown is not None else None))
    return tuple(out)


def load_splits_file(path: str | os.PathLike) -> SplitList:
    """``--splits FILE``: parsed as JSON (never run); a regular file of at most ``MAX_SPLITS_BYTES``."""
    text = read_bounded(path, "--splits", MAX_SPLITS_BYTES)
    try:
        data = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BackMixError(f"cannot read --splits {path}: {e}") from None
    except RecursionError:
        raise BackMixError(f"cannot read --splits {path}: nested too deep") from None
    return SplitList(f"--splits {path}", _entries(data, f"--splits {path}"))


def protocol(name: str) -> SplitList:
    """``--protocol NAME``: the published splits shipped in protocols.json (ssb.json for the SSB's)."""
    if name not in PROTOCOLS:
        raise BackMixError(f"unknown --protocol {name!r} (choose from {', '.join(PROTOCOLS)})")
    if name in SSB_PROTOCOLS:
        known, open_sets = ssb_lists(name)
        return SplitList(f"--protocol {name}", ((known, None),), known, every_known=True, open_sets=open_sets)
    shipped = json.loads(read_bounded(PROTOCOLS_FILE, "--protocol", MAX_SPLITS_BYTES).decode("utf-8"))[name]
    classes = tuple(shipped["classes"]) if "classes" in shipped else None
    return SplitList(f"--protocol {name}", _entries(shipped["splits"], str(PROTOCOLS_FILE)), classes)


def split_list(protocol_name: Optional[str], splits_file: Optional[str]) -> Optional[SplitList]:
    """The split list a run names, if any (the two options exclude each other)."""
    if protocol_name and splits_file:
        raise BackMixError("--protocol and --splits both name the split list; give one of them")
    if protocol_name:
        return protocol(protocol_name)
    return load_splits_file(splits_file) if splits_file else None
