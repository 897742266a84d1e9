"""The file a figure (``show``'s sheet, ``bench loader``'s and ``bench peers``' plots) is written to: its
format is the one its extension names, checked before any work; and the writing, the same for each.

matplotlib writes what the extension names (x.pdf a PDF, x.svg an SVG); a file without an extension
is a PNG under the name given. An extension matplotlib cannot write is refused at once, not after
the work whose figure it is. PGF is left out: it needs a LaTeX installation to write.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from backmix._fs import check_output_file
from backmix.osr_data.errors import BackMixError

NEEDS_MORE = ("pgf",)
# BackMix off, the mixed crop alone, clean and mixed crops: one colour each in every benchmark plot
MODE_COLOURS = {"off": "tab:blue", "on": "tab:orange", "on+clean": "tab:red"}


def figure_formats() -> list[str]:
    from matplotlib.backend_bases import FigureCanvasBase
    return [f for f in FigureCanvasBase.get_supported_filetypes() if f not in NEEDS_MORE]


def check_figure_file(path: str | os.PathLike, flag: str = "--out") -> tuple[Path, str]:
    """(path, format) of a figure file that can be written, refused in one line before any work."""
    path = check_output_file(path, flag)
    if not path.suffix:
        return path, "png"
    fmt = path.suffix[1:].lower()
    formats = figure_formats()
    if fmt not in formats:
        raise BackMixError(f"{flag} {path}: a figure cannot be written as .{fmt}; name a file ending in "
                           f"{', '.join('.' + f for f in formats)}")
    return path, fmt


def check_report_files(json_path: Optional[Path], plot_path: Optional[Path]) -> None:
    """A benchmark's ``--json`` report and ``--plot`` figure (either may be None), checked before the
    work: each can be written, and they are two files (else the plot would overwrite the report)."""
    if json_path is not None:
        check_output_file(json_path, "--json")
    if plot_path is not None:
        check_figure_file(plot_path, "--plot")
    if json_path is not None and plot_path is not None and Path(json_path).resolve() == Path(plot_path).resolve():
        raise BackMixError(f"--json and --plot both name {json_path}: the plot would overwrite the report; "
                           "give each its own file")


def pyplot():
    """matplotlib's pyplot drawing to files only (the Agg backend: no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str | os.PathLike, flag: str = "--out", dpi: Optional[float] = None) -> Path:
    """Write ``fig`` to ``path`` (its folder made) in the format its extension names, then close it."""
    import matplotlib.pyplot as plt
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format=check_figure_file(path, flag)[1], **({} if dpi is None else {"dpi": dpi}))
    plt.close(fig)
    return path
