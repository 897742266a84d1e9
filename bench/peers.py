"""``backmix bench peers``: backmix's loaders beside each family's stock loader, on the same folder.

For each installed family (torch, FFCV, DALI), its stock loader as its own documentation recommends
(bench/peer_loaders.py) beside backmix's backends of that family (torch: reference and torchvision;
FFCV: a JPEG beton at the stock beton's quality, and a raw one; DALI) with BackMix off, on (the mixed
crop alone) and on+clean (clean and mixed crops, the trainer's default stream). All take the same
folder, a RandomResizedCrop to --crop (backmix's of its --canvas canvas), flip and normalise, the same
batch size, workers/threads and device. Each measurement runs in a fresh process
(``python -m backmix.bench.peer_run``) and times --batches batches after --warmup; rounds
interleave them: round r runs every configuration once, in an order rotated by r, so drift on a shared
machine hits them alike. A ratio to stock (backmix images/s / stock images/s, the same family) is taken
within each round, then the median over rounds. The machine, the versions and the 1-minute load before
and after each round are recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple, Optional

from backmix.osr_data.errors import BackMixError

from .loader import MODES, add_bench_folder_options, ensure_beton
from .machine import machine
from .peer_run import FAMILIES, FAMILY_BACKENDS

LIBRARIES = {"ffcv": "FFCV", "dali": "DALI"}   # family -> the library it needs beyond torch


class Peer(NamedTuple):
    """One configuration measured: a family's stock loader (loader "stock", no mode) or a backmix backend
    in a mode; ``storage`` names an FFCV beton ("jpg90", "raw")."""
    family: str
    loader: str
    mode: str = ""
    storage: str = ""

    @property
    def name(self) -> str:
        if self.loader == "stock":
            return f"{self.family} stock"
        return " ".join(part for part in (self.loader, self.storage, self.mode) if part)


def missing_library(family: str) -> Optional[str]:
    """The library ``family`` needs that is not installed (None: all there)."""
    from backmix.pipeline.beton import require_ffcv
    from backmix.pipeline.loaders import require_dali
    try:
        {"torch": lambda: None, "ffcv": require_ffcv, "dali": require_dali}[family]()
    except BackMixError:
        return LIBRARIES[family]
    return None


def peers_of(family: str, jpeg_quality: int) -> list[Peer]:
    storages = (f"jpg{jpeg_quality}", "raw") if family == "ffcv" else ("",)
    return [Peer(family, "stock")] + [Peer(family, backend, mode, storage) for backend in FAMILY_BACKENDS[family]
                                      for storage in storages for mode in MODES]


def prepare_betons(index, canvas: int, jpeg_quality: int, workers: int) -> dict[str, dict]:
    """The three betons FFCV's rows read, written once each where missing: {storage: {path, bytes}}."""
    from .peer_loaders import STOCK_MAX_RESOLUTION, write_stock_beton
    paths = {"stock": write_stock_beton(index, jpeg_quality, workers),
             f"jpg{jpeg_quality}": ensure_beton(index, canvas, "jpg", jpeg_quality),
             "raw": ensure_beton(index, canvas, "raw")}
    what = {"stock": f"FFCV DatasetWriter, longer side <= {STOCK_MAX_RESOLUTION}, jpg {jpeg_quality}",
            f"jpg{jpeg_quality}": f"backmix write-beton, {canvas} x {canvas} canvases, jpg {jpeg_quality}",
            "raw": f"backmix write-beton, {canvas} x {canvas} canvases, raw pixels"}
    return {k: {"path": str(p), "bytes": p.stat().st_size, "what": what[k]} for k, p in paths.items()}


def measure(peer: Peer, setup: dict, timeout: float) -> dict:
    """``peer_run``'s result for ``peer`` in a fresh process, or {"error": its one line}. The child runs in
    its own session: on a timeout or Ctrl-C it and its workers are killed together."""
    cmd = [sys.executable, "-m", "backmix.bench.peer_run", "--family", peer.family, "--loader", peer.loader,
           "--mode", peer.mode or "off", "--data", setup["data"], "--batch-size", str(setup["batch_size"]),
           "--canvas", str(setup["canvas"]), "--crop", str(setup["crop"]), "--workers", str(setup["workers"]),
           "--device", setup["device"], "--batches", str(setup["batches"]), "--warmup", str(setup["warmup"])]
    if peer.family == "ffcv":
        cmd += ["--beton", setup["betons"]["stock" if peer.loader == "stock" else peer.storage]["path"]]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException as e:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        if isinstance(e, subprocess.TimeoutExpired):
            return {"error": f"no result within {timeout:g} s (--timeout)"}
        raise
    lines = out.strip().splitlines()
    if proc.returncode != 0 or not lines:
        said = [line for line in err.strip().splitlines() if line.strip()]
        return {"error": (said[-1] if said else f"exit status {proc.returncode}").removeprefix("backmix: error: ")}
    return json.loads(lines[-1])


def run_rounds(peers: list[Peer], setup: dict, rounds: int, timeout: float) -> list[dict]:
    """Every peer once a round, the order rotated by one each round; a progress line per measurement."""
    records = []
    for r in range(rounds):
        order = peers[r % len(peers):] + peers[:r % len(peers)]
        record = {"round": r + 1, "order": [p.name for p in order], "load_1min_before": os.getloadavg()[0],
                  "results": {}}
        for i, peer in enumerate(order):
            result = measure(peer, setup, timeout)
            record["results"][peer.name] = result
            said = f"{result['images_per_s']:.0f} images/s" if "images_per_s" in result else result["error"]
            print(f"round {r + 1}/{rounds}, {i + 1}/{len(order)}: {peer.name}: {said}", file=sys.stderr, flush=True)
        record["load_1min_after"] = os.getloadavg()[0]
        record["ratio_to_stock"] = round_ratios(peers, record["results"])
        records.append(record)
    return records


def round_ratios(peers: list[Peer], results: dict) -> dict[str, float]:
    """backmix images/s / stock images/s of the same family, within one round (where both ran)."""
    def rate(name):
        return results.get(name, {}).get("images_per_s")
    return {p.name: rate(p.name) / rate(f"{p.family} stock") for p in peers
            if p.loader != "stock" and rate(p.name) and rate(f"{p.family} stock")}


def summarise(peers: list[Peer], records: list[dict]) -> list[dict]:
    """One row per peer: the medians over rounds, each round's figures, the last error if any."""
    rows = []
    for p in peers:
        rates = [rec["results"][p.name].get("images_per_s") for rec in records]
        ratios = [rec["ratio_to_stock"].get(p.name) for rec in records]
        batch_ms = [rec["results"][p.name]["batch_ms_median"] for rec in records if "batch_ms_median" in rec["results"][p.name]]
        errors = [rec["results"][p.name]["error"] for rec in records if "error" in rec["results"][p.name]]
        row = {"name": p.name, "family": p.family, "loader": p.loader, "mode": p.mode or None,
               "beton": p.storage or ("stock" if p.family == "ffcv" else None),
               "images_per_s": _median(rates), "images_per_s_rounds": rates,
               "batch_ms_median": _median(batch_ms)}
        if p.loader != "stock":
            row.update({"ratio_to_stock": _median(ratios), "ratio_to_stock_rounds": ratios})
        if errors:
            row["error"] = errors[-1]
        rows.append(row)
    return rows


def _median(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def versions() -> dict[str, str]:
    from importlib import metadata
    found = {"python": platform.python_version()}
    for dist in metadata.distributions():
        name = dist.metadata["Name"] or ""
        if name.lower() in ("backmix", "torch", "torchvision", "numpy", "pillow", "ffcv", "numba",
                            "opencv-python-headless", "opencv-python") or name.lower().startswith("nvidia-dali"):
            found[name] = dist.version
    return found


def run_peers(args) -> dict:
    """The report (the JSON file): command, machine (cpu, cores, usable_cores, system, python, gpu), versions,
    data, images, formats (of up to 256 files, from their headers), config, rounds, families (measured),
    skipped ({family: why}), betons ({stock, jpgQ, raw}: path, bytes, what), results (one row per
    configuration: name, family, loader, mode, beton, images_per_s (median over rounds),
    images_per_s_rounds, batch_ms_median; backmix's rows also ratio_to_stock (median) and
    ratio_to_stock_rounds, each backmix images/s / stock images/s of the same round; error: the last
    failure's line) and round_records (round, order, load_1min_before/after, results, ratio_to_stock)."""
    from .folders import default_bench_folder, make_bench_folder
    from backmix.osr_data.index import ImageIndex

    from backmix.pipeline.beton_location import check_storage
    from backmix.pipeline.config import LoaderConfig, choose_device

    families = list(dict.fromkeys(f.strip() for f in args.families.split(",") if f.strip()))
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise BackMixError(f"--families takes a comma list of {', '.join(FAMILIES)}, got {args.families!r}")
    for flag, value, least in (("--rounds", args.rounds, 1), ("--batches", args.batches, 1),
                               ("--warmup", args.warmup, 0), ("--timeout", args.timeout, 1)):
        if not value >= least:   # NaN too
            raise BackMixError(f"{flag} must be >= {least}, got {value}")
    check_storage("jpg", args.jpeg_quality)
    # The loaders' own checks (canvas, crop, batch size, workers), before any work.
    LoaderConfig(batch_size=args.batch_size, canvas=args.canvas, crop=args.crop, augment="rrc",
                 num_workers=args.workers, device=args.device)
    device = choose_device(args.device).type
    if args.data is None:
        index = make_bench_folder(default_bench_folder(args.images), args.images)
    else:
        index = ImageIndex.load(args.data / "train" if (args.data / "train").is_dir() else args.data)
    if len(index) < args.batch_size:
        raise BackMixError(f"{index.root} holds {len(index)} images, fewer than one batch of {args.batch_size}: "
                           "give a smaller --batch-size or more images")
    skipped = {}
    for family in families:
        missing = missing_library(family)
        if missing:
            skipped[family] = f"{missing} not installed"     # a line of the table
    measured = [f for f in families if f not in skipped]
    if not measured:
        raise BackMixError(f"no family to measure: {', '.join(skipped.values())}")
    setup = {"data": str(index.root), "batch_size": args.batch_size, "canvas": args.canvas, "crop": args.crop,
             "workers": args.workers, "device": device, "batches": args.batches, "warmup": args.warmup,
             "augment": "rrc", "canvas_mode": "center", "jpeg_quality": args.jpeg_quality, "betons": {}}
    if "ffcv" in measured:
        setup["betons"] = prepare_betons(index, args.canvas, args.jpeg_quality, args.workers)
    peers = [p for family in measured for p in peers_of(family, args.jpeg_quality)]
    records = run_rounds(peers, setup, args.rounds, args.timeout)
    from .stages import file_formats
    formats = file_formats([Path(index.abspath(i)).read_bytes() for i in range(min(256, len(index)))])
    ran_as_backmix = sys.argv[0].endswith(("backmix", "__main__.py"))
    return {"command": "backmix " + " ".join(sys.argv[1:]) if ran_as_backmix else None,
            "machine": machine(), "versions": versions(), "data": str(index.root), "images": len(index),
            "formats": formats, "config": {k: v for k, v in setup.items() if k not in ("data", "betons")},
            "rounds": args.rounds, "families": measured, "skipped": skipped, "betons": setup["betons"],
            "results": summarise(peers, records), "round_records": records}


def register(sub) -> None:
    p = sub.add_parser("peers", help="backmix's loaders beside the stock torchvision, FFCV and DALI loaders",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description=__doc__.split("\n\n", 1)[1])
    add_bench_folder_options(p)
    p.add_argument("--families", default=",".join(FAMILIES),
                   help="comma list of loader families; one whose library is missing is skipped with one line")
    p.add_argument("--rounds", type=int, default=5,
                   help="interleaved rounds, each running every configuration once; figures are medians over rounds")
    p.add_argument("--batches", type=int, default=20,
                   help="timed batches per measurement (more: less weight on the prefetched batches at the start)")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first, in each measurement")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch, every loader")
    p.add_argument("--canvas", type=int, default=256,
                   help="backmix's loaders: the square canvas (shorter side resized, centre square) the mix works on")
    p.add_argument("--crop", type=int, default=224, help="side of the RandomResizedCrop every loader outputs")
    p.add_argument("--workers", type=int, default=2, help="worker processes/threads, the same for every loader")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the batches go (and DALI and FFCV run their GPU recipes); auto: CUDA when there is one")
    p.add_argument("--jpeg-quality", type=int, default=90,
                   help="JPEG quality of the stock FFCV beton and of backmix's JPEG beton (like for like)")
    p.add_argument("--timeout", type=float, default=600,
                   help="seconds one measurement may take; past it, it is killed and recorded as failed")
    p.add_argument("--out", type=Path, default=Path("bench-peers"), help="folder of the JSON report and the plot")
    p.add_argument("--json", type=Path, default=None, help="the JSON report's file; None: OUT/peers.json")
    p.add_argument("--plot", type=Path, default=None,
                   help="the plot's file, in the format its extension names (images/s per configuration, a dot per "
                        "round); None: OUT/peers.png")
    p.set_defaults(func=run_bench_peers)


def run_bench_peers(args) -> int:
    from .figure_file import check_report_files
    from .peer_report import format_table, plot

    json_path, plot_path = args.json or args.out / "peers.json", args.plot or args.out / "peers.png"
    check_report_files(json_path, plot_path)   # before the work
    report = run_peers(args)
    print(format_table(report))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, plot_path)
    print(f"wrote {json_path} and {plot_path}")
    return 0
