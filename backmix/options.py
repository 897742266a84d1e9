"""The options several commands share, each declared here once: its flags, its help text and its
default. The default is the one of the config field (or function argument) the option fills, read
from there, so it is never retyped; a command whose default differs (a benchmark's larger canvas, a
default taken from a checkpoint) passes its own, and the help text stays this one.

Torch-free at import, so that ``--help`` stays fast: a field's default is read (and its module
imported) only when a command that leaves the default to it registers."""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional

from backmix.device import DEVICE_HELP, device_option
from backmix.osr_data.options import CANVAS_MODES, CROP_FROM, CROP_FROM_HELP


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None (the help says what happens then), flags and required options."""

    def _get_help_string(self, action):
        if action.default is None or action.required or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def _choices(module: str, name: str) -> Callable[[], dict]:
    return lambda: {"choices": getattr(importlib.import_module(module), name)}


@dataclass(frozen=True)
class Option:
    flag: str
    help: str
    source: str                      # "module:Object.name": the config field (or argument) it fills
    kwargs: Callable[[], dict] = dict


LOADER, TRAINER = "backmix.pipeline.config:LoaderConfig.", "backmix.trainers.config:TrainConfig."


def _int() -> dict:
    return {"type": int}


OPTIONS = {
    "batch_size": Option("--batch-size", "images per batch (under torchrun: per rank)", LOADER + "batch_size", _int),
    "canvas": Option("--canvas", "side of the square canvas the mix works on", LOADER + "canvas", _int),
    "crop": Option("--crop", "side of the random crop the model sees", LOADER + "crop", _int),
    "canvas_mode": Option("--canvas-mode", "canvas of each image: center = shorter side resized to the canvas, "
                                           "centre square (the authors'); stretch = both sides resized",
                          LOADER + "canvas_mode", lambda: {"choices": CANVAS_MODES}),
    "augment": Option("--augment", "after the mix: crop = random crop + flip; rrc = RandomResizedCrop of the mixed "
                                   "canvas to the crop size + flip (evaluation: the centre crop)",
                      LOADER + "augment", _choices("backmix.pipeline.sampling", "AUGMENTS")),
    "crop_from": Option("--crop-from", CROP_FROM_HELP, LOADER + "crop_from", lambda: {"choices": CROP_FROM}),
    "grid": Option("--grid", "g of the g x g foreground maps", LOADER + "grid", _int),
    "backend": Option("--backend", "loader backend (a benchmark: a comma list of them, each measured)",
                      TRAINER + "backend", _choices("backmix.pipeline.loaders", "BACKENDS")),
    "ray_address": Option("--ray-address", "--backend ray: the Ray cluster whose CPUs decode", TRAINER + "ray_address",
                          lambda: {"metavar": "auto|HOST:PORT"}),
    "prefetch": Option("--prefetch", "--backend ray: batches in flight at most", TRAINER + "prefetch", _int),
    "workers": Option("--workers", "decoding worker processes (or threads)", LOADER + "num_workers", _int),
    "on_error": Option("--on-error", "an image that does not decode: raise = stop; skip = leave it out, "
                                     "named and counted",
                       LOADER + "on_error", _choices("backmix.pipeline.config", "ON_ERROR")),
    "device": Option("--device", DEVICE_HELP, "backmix.device:choose_device.request", lambda: {"type": device_option}),
}
GEOMETRY = ("canvas", "crop", "canvas_mode", "augment")

# What a default of None means, where the help says it in words.
NONE_MEANS = {"ray_address": ("backmix.pipeline.loaders", "LOCAL_RAY_HELP"),
              "prefetch": ("backmix.pipeline.ray_loader", "DEFAULT_PREFETCH")}


def none_means(name: str) -> str:
    module, constant = NONE_MEANS[name]
    return str(getattr(importlib.import_module(module), constant))


def default_of(source: str) -> Any:
    """The default of ``"module:Object.name"``: a dataclass field's, or a function argument's."""
    module, _, path = source.partition(":")
    owner_name, _, name = path.partition(".")
    owner = getattr(importlib.import_module(module), owner_name)
    if dataclasses.is_dataclass(owner):
        return {f.name: f.default for f in dataclasses.fields(owner)}[name]
    return inspect.signature(owner).parameters[name].default


UNSET = object()   # no default given: the field's


def add_option(p, name: str, default: Any = UNSET, *, said: Optional[str] = None, several: bool = False,
               shown: Any = UNSET, aliases: tuple[str, ...] = ()) -> None:
    """Adds the shared option ``name`` to ``p``. ``default``: the command's own (else the field's);
    ``said``: the default in words, for a default (None) the command resolves later; ``several``: a
    comma list of values instead of one (the benchmarks'); ``shown``: the default the help states
    where ``default`` is ``argparse.SUPPRESS`` (the option stays out of the namespace when not given);
    ``aliases``: other spellings a command has always accepted."""
    option = OPTIONS[name]
    kwargs = option.kwargs()
    help_text = option.help
    if several:   # the choices are checked one by one, by the command
        kwargs.pop("choices", None)
    if default is UNSET:
        default = default_of(option.source)
    if shown is not UNSET:
        said = none_means(name) if shown is None and name in NONE_MEANS else str(shown)
    elif default is None and said is None and name in NONE_MEANS:
        said = none_means(name)
    if said is not None:
        help_text += f" (default: {said})"
    p.add_argument(option.flag, *aliases, default=default, help=help_text, **kwargs)


def add_options(p, names, *, defaults: Optional[dict] = None, said: Optional[dict] = None,
                only_given: Optional[str] = None) -> None:
    """Adds the shared options ``names`` (e.g. ``GEOMETRY``) to ``p``, each with the
    command's default from ``defaults`` where it has its own, and its default in words from ``said``.
    ``only_given`` ("module:Config"): an option not given stays out of the namespace (the command knows
    what was explicit), and the help states the default of the same-named field of that config."""
    defaults, said = defaults or {}, said or {}
    for name in names:
        if only_given:
            add_option(p, name, argparse.SUPPRESS, shown=default_of(f"{only_given}.{name}"))
        else:
            add_option(p, name, defaults.get(name, UNSET), said=said.get(name))

