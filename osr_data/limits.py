"""Bounds on what a user hands the project: a file, an image header, a YAML document. A small input can
declare a huge one (an alias bomb, a 900000 x 1 PNG, /dev/zero as a config), so each is checked against
its bound before the work that would need the memory. Every bound has a name, a default and an
environment variable that overrides it; README.md's "Bad input" table lists them."""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import BackMixError


@dataclass(frozen=True)
class Limit:
    env: str        # the environment variable that overrides the default
    default: int
    unit: str       # what is counted, for the messages

    def value(self) -> int:
        text = os.environ.get(self.env, str(self.default))
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise BackMixError(f"{self.env} must be a positive number of {self.unit}, got {text!r}")
        return value


# An image header declaring more pixels than this is refused before decoding (PIL's default).
MAX_IMAGE_PIXELS = Limit("BACKMIX_MAX_IMAGE_PIXELS", 89_478_485, "pixels")
# Longer side over shorter side: the centre canvas resizes the shorter side to the canvas, so a
# 900000 x 1 image asks for a canvas x 36,000,000 resize however few pixels it has.
MAX_IMAGE_ASPECT = Limit("BACKMIX_MAX_IMAGE_ASPECT", 100, "times the shorter side")
# --config FILE: its bytes, and the values it holds once YAML aliases are expanded.
MAX_CONFIG_BYTES = Limit("BACKMIX_MAX_CONFIG_BYTES", 1 << 20, "bytes")
MAX_CONFIG_VALUES = Limit("BACKMIX_MAX_CONFIG_VALUES", 100_000, "values")
# --splits FILE (a list of class name lists: 1,000 classes in 5 splits is about 100 KB).
MAX_SPLITS_BYTES = Limit("BACKMIX_MAX_SPLITS_BYTES", 16 << 20, "bytes")

# The longest value quoted in a message: a value the user gave can be megabytes long.
MAX_QUOTED_CHARS = 80


def quoted(value) -> str:
    """``repr(value)`` cut to ``MAX_QUOTED_CHARS`` characters; a long or deep list is never built whole."""
    import reprlib
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 3, MAX_QUOTED_CHARS, MAX_QUOTED_CHARS
    text = short.repr(value)
    return text if len(text) <= MAX_QUOTED_CHARS else text[:MAX_QUOTED_CHARS - 3] + "..."


def check_regular_file(path: str | os.PathLike, flag: str) -> Path:
    """``path`` when it is a regular file (or a link to one); else one line saying what it is instead:
    missing, a folder, or a device, pipe or socket (``/dev/zero`` never ends)."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise BackMixError(f"{flag} {path} does not exist") from None
    except OSError as e:
        raise BackMixError(f"cannot read {flag} {path}: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        raise BackMixError(f"{flag} {path} is a folder; give a file")
    if not stat.S_ISREG(mode):
        raise BackMixError(f"{flag} {path} is not a regular file")
    return path


def read_bounded(path: str | os.PathLike, flag: str, limit: Limit) -> bytes:
    """The bytes of the regular file ``path`` (``flag`` names it in messages), refused in one line when
    it is not a regular file or is larger than ``limit``."""
    path = check_regular_file(path, flag)
    most = limit.value()
    try:
        with open(path, "rb") as f:
            data = f.read(most + 1)   # the file may grow after the check: the read is what counts
    except OSError as e:
        raise BackMixError(f"cannot read {flag} {path}: {e.strerror or e}") from None
    if len(data) > most:
        raise BackMixError(f"{flag} {path} is larger than {most} bytes ({limit.env})")
    return data
