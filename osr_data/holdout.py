"""The validation split: a seeded, per-class share of the known classes' training images.

Model selection must not see the test folder (Vaze et al. 2022 select on closed-set
accuracy of held-out *training* images of the known classes). The rows held out
here are never trained on and never enter the foreground cache's rebuilds.
Which rows a class gives up depends only on (seed, that class's label): the same
class keeps the same validation images in every open-set split, and the methods
of one (split, seed) pair train on the very same rows.
"""
from __future__ import annotations

import numpy as np

from .errors import BackMixError


def validation_count(n: int, fraction: float) -> int:
    """Images of a class of ``n`` held out: ``round(fraction * n)``, at least one when
    ``fraction > 0``, and never the class's last training image."""
    if fraction <= 0 or n < 2:
        return 0
    return int(min(n - 1, max(1, round(fraction * n))))


def split_validation(labels: np.ndarray, rows: np.ndarray, fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, validation rows) of ``rows`` (indices into ``labels``), both sorted."""
    if not 0 <= fraction < 1:
        raise BackMixError(f"--val-fraction must lie in [0, 1), got {fraction}")
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    if fraction == 0 or rows.size == 0:
        return rows, np.empty(0, dtype=np.int64)
    row_labels = np.asarray(labels)[rows]
    # The rows grouped by class, each group ascending (a stable sort of sorted rows): one sort, not a
    # pass over every row for each class (rows x classes: a noticeable part of a start at ImageNet size).
    order = np.argsort(row_labels, kind="stable")
    grouped = rows[order]
    classes, starts = np.unique(row_labels[order], return_index=True)
    held = []
    for label, mine in zip(classes, np.split(grouped, starts[1:])):
        rng = np.random.default_rng([int(seed), int(label)])
        held.append(mine[rng.permutation(mine.size)[:validation_count(mine.size, fraction)]])
    val = np.sort(np.concatenate(held))
    return np.setdiff1d(rows, val, assume_unique=True), val
