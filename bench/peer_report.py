"""What ``backmix bench peers`` shows of its report: the table on stdout and the PNG plot."""
from __future__ import annotations

from pathlib import Path

from .figure_file import MODE_COLOURS, pyplot, save_figure
from .machine import machine_line
from .peer_loaders import STOCK_NAMES
from .stages import describe_input

COLOURS = {None: "tab:gray", **MODE_COLOURS}   # None: a stock loader


def loader_words(row: dict) -> str:
    if row["loader"] == "stock":
        return f"stock: {STOCK_NAMES[row['family']]}"
    beton = f", {row['beton']} beton" if row["family"] == "ffcv" else ""
    return f"backmix {row['loader']}{beton}"


def _spread(values: list, digits: int) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{min(values):.{digits}f}-{max(values):.{digits}f}"


def format_table(report: dict) -> str:
    c = report["config"]
    lines = [f"input: {describe_input(report['images'], report['formats'])}, {report['data']}",
             f"{c['crop']} RandomResizedCrop + flip + normalise (backmix: of a {c['canvas']} {c['canvas_mode']} canvas), "
             f"batch {c['batch_size']}, {c['workers']} workers/threads, {c['device']}; {report['rounds']} round(s) of "
             f"{c['batches']} batches after {c['warmup']} warm-up, each in a fresh process", "",
             "| family | loader | BackMix | images/s (median) | rounds | / stock (median) | rounds |",
             "|---|---|---|---:|---:|---:|---:|"]
    failed = []
    for row in report["results"]:
        rate = "-" if row["images_per_s"] is None else f"{row['images_per_s']:.0f}"
        if row["loader"] == "stock":
            ratios = ""
        else:
            ratio = "-" if row["ratio_to_stock"] is None else f"{row['ratio_to_stock']:.2f}"
            ratios = f"{ratio} | {_spread(row['ratio_to_stock_rounds'], 2)}"
        lines.append(f"| {row['family']} | {loader_words(row)} | {row['mode'] or ''} | {rate} | "
                     f"{_spread(row['images_per_s_rounds'], 0)} | {ratios or ' | '} |")
        if "error" in row:
            failed.append(f"failed: {row['name']}: {row['error']}")
    lines += [""] + failed
    if report["betons"]:
        lines.append("betons on disk: " + "; ".join(f"{name} ({b['what']}) {b['bytes'] / 1e6:.1f} MB"
                                                    for name, b in report["betons"].items()))
    lines.append(f"machine: {machine_line(report['machine'])}")
    lines.append("load (1 min) before -> after each round: " + ", ".join(
        f"{r['load_1min_before']:.1f} -> {r['load_1min_after']:.1f}" for r in report["round_records"]))
    lines += [f"skipped: {why}" for why in report["skipped"].values()]
    if report["rounds"] == 1:
        lines.append("one round only: these figures are noisy; take the median of --rounds 5 or more")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """images/s per configuration (bar: the median; dots: the rounds), grouped by family."""
    plt = pyplot()

    rows = report["results"]
    x, ticks, groups, pos = [], [], {}, 0.0
    for i, row in enumerate(rows):
        if i and row["family"] != rows[i - 1]["family"]:
            pos += 0.8                      # a gap between families
        x.append(pos)
        groups.setdefault(row["family"], []).append(pos)
        ticks.append("stock" if row["loader"] == "stock" else row["name"].replace(" ", "\n"))
        pos += 1
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * pos + 2), 4.2), dpi=100)
    for xi, row in zip(x, rows):
        ax.bar(xi, row["images_per_s"] or 0, color=COLOURS[row["mode"]], hatch="//" if row["beton"] == "raw" else None,
               edgecolor="white")
        dots = [v for v in row["images_per_s_rounds"] if v is not None]
        ax.plot([xi] * len(dots), dots, "k.", ms=4)
    ax.set_xticks(x, ticks, fontsize=6)
    for family, xs in groups.items():
        ax.annotate(family, (sum(xs) / len(xs), 1.0), xycoords=("data", "axes fraction"), ha="center", va="bottom",
                    fontsize=9, fontweight="bold")
    ax.set_ylabel("images/s")
    c = report["config"]
    ax.set_title(f"{describe_input(report['images'], report['formats'])}, {c['crop']} RRC (backmix: {c['canvas']} canvas), "
                 f"batch {c['batch_size']}, {c['workers']} workers, {c['device']}; bars: median of {report['rounds']} "
                 f"round(s), dots: rounds\n{machine_line(report['machine'])}",
                 fontsize=7, pad=16)
    fig.tight_layout()
    save_figure(fig, path, "--plot")
