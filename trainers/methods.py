"""The training recipes compared by the experiment, by name: what each sets in ``TrainConfig``.

A method is a loss and the crops it reads; every other field (model, schedule, seed, validation
rows) is shared, so two methods of one (split, seed) differ only here. Forward/backward passes per
image say what a method costs a step: BackMix's default (clean + mixed) is two, so its
compute-matched baseline is ``baseline-2view``, and ``backmix-p50`` is BackMix at one pass.
"""
from __future__ import annotations

from backmix.osr_data.errors import BackMixError

METHODS = {
    "baseline": {"backmix": False},                       # CE on one clean crop
    "baseline-2view": {"backmix": False, "views": 2},     # CE on two independently augmented clean crops
    "backmix": {"backmix": True},                         # CE on the clean and the mixed crop (trainer's default)
    "backmix-mixed": {"backmix": True, "w_raw": 0.0},     # CE on the mixed crop alone (the authors' recipe)
    "backmix-p50": {"backmix": True, "mix_prob": 0.5},    # one crop per image, its mixed one with p = 0.5
}


def method_fields(name: str) -> dict:
    if name not in METHODS:
        raise BackMixError(f"unknown method {name!r} (choose from {', '.join(METHODS)})")
    return dict(METHODS[name])


def forward_passes(backmix: bool, w_raw: float, views: int = 1, mix_prob=None) -> int:
    """Forward/backward passes per training image of a run's config."""
    if not backmix:
        return views
    return 1 if (mix_prob is not None or w_raw == 0) else 2


def method_name(backmix: bool, w_raw: float, views: int = 1, mix_prob=None) -> str:
    """The name of a run's recipe: a ``METHODS`` name, or what its fields say."""
    if not backmix:
        return "baseline-2view" if views == 2 else "baseline"
    if mix_prob is not None:
        return f"BackMix (mix prob {mix_prob:g})"
    return "BackMix (mixed only)" if w_raw == 0 else "BackMix"
