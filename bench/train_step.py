"""``backmix bench train``: what each training recipe costs a whole training step.

For each backend and each recipe of ``backmix.trainers.methods`` (baseline, baseline-2view,
backmix, backmix-mixed, backmix-p50), a fresh model (the same seed for every row) trains on that
recipe's stream as ``backmix train`` does: batch from the loader, forward over ``batch.inputs()``,
the recipe's loss (``batch.loss``), backward, optimiser step, under the trainer's precision (AMP and
channels-last on CUDA). The first ``--warmup`` steps of an epoch start the workers and warm the
kernels; the next ``--steps`` steps of the same epoch are timed, so no epoch boundary (worker start,
a new shuffle) falls in the window. images/s counts the data set's images a step consumes, not
forward passes; the data-wait share is the part of the window the step waited for its batch.

Rounds interleave the (backend, recipe) pairs, so drift on a shared machine hits them alike. A
recipe's cost is the median over rounds of its images/s over the plain baseline's in the same round
and backend ("vs baseline"), and over the baseline of its own forward passes ("vs same passes":
baseline-2view for clean + mixed). The cache's rebuild (an epoch's CAMs every ``--regen-every``
epochs of training) is outside the window; ``backmix bench scale`` times it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Optional

from backmix.osr_data.errors import BackMixError
from backmix.trainers.methods import METHODS

from .machine import machine, machine_line


def recipe_config(method: str, **fields):
    """The trainer's config of a recipe (its defaults for what the recipe leaves out)."""
    from backmix.trainers.config import TrainConfig
    return TrainConfig(**fields, **METHODS[method])


def time_steps(backend: str, method: str, index, *, arch: str, crop: int, canvas: int, batch_size: int,
               workers: int, device, amp: str, steps: int, warmup: int, seed: int, augment: str) -> dict:
    """Seconds and data waits of ``steps`` training steps after ``warmup``, within one epoch."""
    import torch
    from torch import nn

    from backmix.cam_cache.maps import UniformMaps
    from backmix.models import build_model
    from .stages import sync
    from backmix.pipeline.loaders import make_loader
    from backmix.trainers.precision import Precision
    from backmix.trainers.run_data import loader_config

    cfg = recipe_config(method, arch=arch, canvas=canvas, crop=crop, augment=augment, batch_size=batch_size,
                        workers=workers, seed=seed)
    r = dataclasses.asdict(cfg)
    # the trainer's loader of the recipe, full batches only (a timed window of whole batches)
    config = dataclasses.replace(loader_config(cfg, device, train=True), last_batch="drop")
    loader = make_loader(backend, index, config, UniformMaps(len(index), config.grid))
    if len(loader) < warmup + steps:
        loader.close()
        raise BackMixError(f"one epoch of {index.root} holds {len(loader)} batches of {batch_size}, fewer than "
                           f"--warmup {warmup} + --steps {steps}: give fewer steps or more images")
    torch.manual_seed(seed)
    classes = int(index.labels.max()) + 1
    model = build_model(arch, classes, **cfg.model_kwargs).to(device)
    precision = Precision(device, amp)
    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    seconds, waits = [], []
    try:
        start = time.perf_counter()
        for i, batch in enumerate(loader):
            waited = time.perf_counter() - start
            x, _ = batch.inputs()
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with precision.autocast():
                loss = batch.loss(criterion, model(x), clean=r["w_raw"], mixed=r["w_mix"])
            optimizer.zero_grad(set_to_none=True)
            precision.backward(loss)
            precision.step(optimizer)
            sync(device)
            end = time.perf_counter()
            if i >= warmup:
                seconds.append(end - start)
                waits.append(waited)
            if len(seconds) == steps:
                break
            start = time.perf_counter()
    finally:
        loader.close()
    return {"images_per_s": batch_size * steps / sum(seconds), "wait_share": sum(waits) / sum(seconds),
            "step_ms_median": 1e3 * statistics.median(seconds)}


def run_bench_train(data: Optional[Path], backends: list[str], methods: list[str], *, arch: str, crop: int,
                    canvas: int, batch_size: int, workers: int, device: str, amp: str, steps: int, warmup: int,
                    rounds: int, n_images: int, seed: int = 0, augment: str = "crop") -> dict:
    from .loader import bench_folder, ensure_beton
    from backmix.pipeline.config import choose_device
    from backmix.pipeline.loaders import BACKENDS

    for b in backends:
        if b not in BACKENDS:
            raise BackMixError(f"unknown backend {b!r} (choose from {', '.join(BACKENDS)})")
    for m in methods:
        if m not in METHODS:
            raise BackMixError(f"unknown method {m!r} (choose from {', '.join(METHODS)})")
    if not backends or not methods:
        raise BackMixError("--backend and --methods must each name at least one")
    if steps < 1 or rounds < 1 or warmup < 0:
        raise BackMixError(f"--steps and --rounds must be >= 1 and --warmup >= 0, got {steps}, {rounds}, {warmup}")
    methods = list(dict.fromkeys(["baseline", *methods]))   # every cost is read against the plain baseline
    if "backmix" in methods and "baseline-2view" not in methods:
        methods.append("baseline-2view")                    # ... and against the baseline of its passes
    data, index = bench_folder(data, n_images)
    if "ffcv" in backends:
        ensure_beton(index, canvas)
    dev = choose_device(device)
    pairs = [(b, m) for b in backends for m in methods]
    rates: dict = {pair: [] for pair in pairs}
    rows: dict = {pair: [] for pair in pairs}
    for _ in range(rounds):
        for backend, method in pairs:
            row = time_steps(backend, method, index, arch=arch, crop=crop, canvas=canvas, batch_size=batch_size,
                             workers=workers, device=dev, amp=amp, steps=steps, warmup=warmup, seed=seed,
                             augment=augment)
            rates[(backend, method)].append(row["images_per_s"])
            rows[(backend, method)].append(row)
    results = []
    for backend, method in pairs:
        rate = rates[(backend, method)]
        passes = recipe_config(method).forward_passes
        same = "baseline-2view" if passes == 2 else "baseline"

        def vs(other: str) -> Optional[float]:
            base = rates.get((backend, other))
            return statistics.median(a / b for a, b in zip(rate, base)) if base and other != method else None

        median = statistics.median(rate)
        results.append({"backend": backend, "method": method, "passes_per_image": passes,
                        "images_per_s": median, "images_per_s_rounds": rate,
                        "spread": [min(rate) / median - 1, max(rate) / median - 1],
                        "wait_share": statistics.median(x["wait_share"] for x in rows[(backend, method)]),
                        "step_ms_median": statistics.median(x["step_ms_median"] for x in rows[(backend, method)]),
                        "vs_baseline": vs("baseline"), "vs_same_passes": vs(same)})
    return {"machine": machine(), "data": str(data), "images": len(index),
            "config": {"arch": arch, "crop": crop, "canvas": canvas, "batch_size": batch_size, "workers": workers,
                       "device": str(dev), "amp": amp, "steps": steps, "warmup": warmup, "rounds": rounds,
                       "augment": augment},
            "results": results}


def format_table(report: dict) -> str:
    c = report["config"]
    lines = [f"bench train: {c['arch']} at {c['crop']} px (canvas {c['canvas']}), batch {c['batch_size']}, "
             f"{c['workers']} workers, {c['device']}; {c['steps']} steps after {c['warmup']}, median of "
             f"{c['rounds']} rounds; {report['images']} images in {report['data']}",
             f"machine: {machine_line(report['machine'])}", "",
             "| backend | recipe | passes/image | images/s | spread | data wait | vs baseline | vs same passes |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    ratio = lambda v: "—" if v is None else f"{v:.2f}"   # noqa: E731
    for r in report["results"]:
        lo, hi = r["spread"]
        lines.append(f"| {r['backend']} | {r['method']} | {r['passes_per_image']} | {r['images_per_s']:.0f} | "
                     f"{100 * lo:+.0f}/{100 * hi:+.0f} % | {100 * r['wait_share']:.0f} % | "
                     f"{ratio(r['vs_baseline'])} | {ratio(r['vs_same_passes'])} |")
    return "\n".join(lines) + "\n"


def register(sub) -> None:
    from .loader import add_bench_folder_options
    from backmix.pipeline.sampling import AUGMENTS

    p = sub.add_parser("train", help="images/s of whole training steps: the plain baseline vs each BackMix recipe",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=__doc__.split("\n\n")[1])
    add_bench_folder_options(p)
    p.add_argument("--backend", default="reference", help="comma list of backends")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma list of recipes (baseline, and baseline-2view beside backmix, are always run)")
    p.add_argument("--arch", default="cnn32", help="model (any `backmix train --arch`)")
    p.add_argument("--canvas", type=int, default=40, help="side of the square canvas the mix works on")
    p.add_argument("--crop", type=int, default=32, help="side of the crop the model sees")
    p.add_argument("--augment", choices=AUGMENTS, default="crop",
                   help="after the mix: crop = random crop + flip; rrc = RandomResizedCrop + flip")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="decoding workers of every loader")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto", help="CUDA only")
    p.add_argument("--steps", type=int, default=10, help="timed steps, within one epoch")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first, in the same epoch")
    p.add_argument("--rounds", type=int, default=5, help="rounds over every (backend, recipe), interleaved")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    p.set_defaults(func=run_cli)


def run_cli(args) -> int:
    from backmix._fs import atomic_write_bytes, check_output_file
    if args.json is not None:
        check_output_file(args.json, "--json")
    report = run_bench_train(args.data, [b.strip() for b in args.backend.split(",") if b.strip()],
                             [m.strip() for m in args.methods.split(",") if m.strip()], arch=args.arch,
                             crop=args.crop, canvas=args.canvas, batch_size=args.batch_size, workers=args.workers,
                             device=args.device, amp=args.amp, steps=args.steps, warmup=args.warmup,
                             rounds=args.rounds, n_images=args.images, augment=args.augment)
    report["command"] = "backmix bench train " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k in ("data", "images", "backend", "methods", "arch", "canvas", "crop", "augment", "batch_size", "workers",
                 "device", "amp", "steps", "warmup", "rounds") and v is not None)
    print(format_table(report), end="")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(args.json, (json.dumps(report, indent=2) + "\n").encode())
    return 0
