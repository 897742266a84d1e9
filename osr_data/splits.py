"""Open-set splits: which classes are known; every other class is unknown.

Random splits follow the OSR protocol (Neal et al. 2018, Vaze et al. 2022): for
10 classes, 6 known and 4 unknown, 5 seeded splits, no two with the same known set. An explicit list of class
names (or labels) is accepted too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import BackMixError


@dataclass(frozen=True)
class OpenSetSplit:
    known: tuple[str, ...]      # class names, in label order of the closed-set head
    unknown: tuple[str, ...]

    def known_labels(self, classes: tuple[str, ...]) -> np.ndarray:
        # One dict of positions: O(classes), where classes.index per known class was O(classes x known).
        position = {c: i for i, c in enumerate(classes)}
        return np.asarray([position[c] for c in self.known], dtype=np.int64)

    def label_map(self, classes: tuple[str, ...]) -> np.ndarray:
        """Dataset label -> closed-set label (0..K-1), -1 for unknown classes."""
        lut = np.full(len(classes), -1, dtype=np.int64)
        lut[self.known_labels(classes)] = np.arange(len(self.known))
        return lut


def random_splits(classes: tuple[str, ...], n_splits: int = 5, n_known: int | None = None,
                  seed: int = 0) -> list[OpenSetSplit]:
    """``n_splits`` distinct random splits with ``n_known`` known classes each (default 60%).

    Each split's known set is a fresh uniform draw; a draw equal to an earlier
    split's is thrown away and drawn again, so split k is the k-th *distinct* set
    of the seed's stream. O(classes) per draw (numpy, no per-class Python work);
    when the known sets are few, the expected number of redraws stays small
    (at most n_splits * H(n_splits) draws when every possible set is needed).
    """
    n = len(classes)
    if n_known is None:
        n_known = max(1, round(0.6 * n))
    if not 0 < n_known < n:
        raise BackMixError(f"a split needs 0 < known classes < {n}, got {n_known}")
    if n_splits < 1:
        raise BackMixError(f"the number of splits must be at least 1, got {n_splits}")
    if math.comb(n, n_known) < n_splits:
        raise BackMixError(f"{n_splits} distinct splits of {n} classes with {n_known} known do not exist "
                           f"(only {math.comb(n, n_known)})")
    names = np.empty(n, dtype=object)
    names[:] = classes
    rng = np.random.default_rng(seed)
    seen: set[bytes] = set()
    splits = []
    while len(splits) < n_splits:
        is_known = np.zeros(n, dtype=bool)
        is_known[rng.permutation(n)[:n_known]] = True
        key = np.packbits(is_known).tobytes()
        if key in seen:
            continue
        seen.add(key)
        splits.append(OpenSetSplit(tuple(names[is_known]), tuple(names[~is_known])))
    return splits


ALL = "all"   # the split of every class known


def split_number(spec) -> int | None:
    """The split number ``spec`` names ("0", " 3 "), None when it is not ASCII digits: ``str.isdigit`` is
    true of "²" and "٣" too, which ``int`` refuses or reads as another number."""
    text = str(spec).strip()
    return int(text) if text.isascii() and text.isdigit() else None


def resolve_split(classes: tuple[str, ...], spec: str | int, n_splits: int = 5,
                  seed: int = 0) -> OpenSetSplit:
    """``spec`` is a split number (``"0"``..), a comma list of known class names, or ``"all"``: every class
    known (the unknowns then come from other folders only, ``--open-test``)."""
    spec = str(spec).strip()
    if spec == ALL:
        return OpenSetSplit(tuple(classes), ())
    k = split_number(spec)
    if k is not None:
        if k >= n_splits:
            raise BackMixError(f"split {k} does not exist: there are {n_splits} random splits (0..{n_splits - 1})")
        return random_splits(classes, n_splits=n_splits, seed=seed)[k]
    known = [c.strip() for c in spec.split(",") if c.strip()]
    missing = [c for c in known if c not in classes]
    if missing:
        raise BackMixError(f"split names class {missing[0]!r}, which does not exist "
                           f"(classes: {', '.join(classes)})")
    if len(set(known)) != len(known) or not 0 < len(known) < len(classes):
        raise BackMixError(f"split {spec!r} must name distinct classes, at least one and not all")
    order = [c for c in classes if c in known]
    return OpenSetSplit(tuple(order), tuple(c for c in classes if c not in known))
