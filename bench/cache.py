"""``backmix bench cache``: the three figures the cache promises, measured in one run.

1. Precompute vs plain inference: images/s of the CAM path (features, einsum
   with the label's weights, scaling, upsampling + pooling) against ``model(x)``
   on the same in-memory batch of canvases, same model, inference mode, on the
   GPU when there is one. Decoding is left out of both: it is the same work
   either way. The two are timed alternately, so a load that comes and goes
   (a shared machine) hits both alike; the figure is the ratio of medians.
2. Publishing a generation of ImageNet-1k's size (synthetic maps): the time of
   ``publish_generation`` (merge the shard, write, fsync, rename, move the
   pointer) and the size of the file on disk.
3. Gather latency: ``ForegroundCache.gather`` of 256 random dataset indices.
4. In-loop rebuild vs separate pass, on the benchmark photo folder with the
   trainer's small CNN (cnn32 width 0.5, canvas 40): what ``--regen loop`` adds
   to an epoch (the CAMs of each batch's canvases, already decoded by the
   training loader, then write + publish) against ``--regen pass`` (decode,
   CAMs, write + publish), same images, same weights, timed alternately.
"""
from __future__ import annotations

import json
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from backmix.cam_cache.cams import class_activation_maps
from backmix.cam_cache.generation_file import write_maps
from backmix.cam_cache.precompute import GenerationWriter, publish_generation
from backmix.cam_cache.rebuild import rebuild_cache
from backmix.cam_cache.store import ForegroundCache, generation_path, init_cache, pending_dir, write_pointer
from backmix.device import choose_device
from backmix.models import build_model, features_and_head
from backmix.osr_data.decode import decode_canvas
from backmix.osr_data.normalize import IMAGENET_MEAN, IMAGENET_STD

from .folders import default_bench_folder, make_bench_folder
from .machine import machine


def _timed(fn, sync) -> float:
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def precompute_vs_inference(arch: str, canvas: int, batch_size: int, grid: int, repeats: int,
                            device: str = "auto", num_classes: int = 1000) -> dict:
    device = choose_device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = build_model(arch, num_classes).eval().to(device)
    body, head = features_and_head(model)
    x = torch.randn(batch_size, 3, canvas, canvas, device=device)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    infer = lambda: model(x)  # noqa: E731
    cams = lambda: class_activation_maps(body(x), head.weight, y, grid, canvas)  # noqa: E731
    t_inf, t_cam = [], []
    with torch.inference_mode():
        _timed(infer, sync), _timed(cams, sync)              # warm-up (allocator, kernels)
        for _ in range(repeats):
            t_inf.append(_timed(infer, sync))
            t_cam.append(_timed(cams, sync))
    t_inf, t_cam = statistics.median(t_inf), statistics.median(t_cam)
    return {"arch": arch, "canvas": canvas, "batch_size": batch_size, "num_classes": num_classes,
            "device": device.type, "repeats": repeats,
            "inference_images_per_s": batch_size / t_inf, "precompute_images_per_s": batch_size / t_cam,
            "precompute_vs_inference_ratio": t_inf / t_cam}


def publish_and_gather(rows: int, grid: int, folder: Path, gathers: int = 2000) -> dict:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    maps = np.full((rows, grid, grid), 0.5, dtype=np.float16)
    labels = rng.integers(0, 1000, rows)
    meta = {"generation": 0, "momentum": 0.0, "checkpoint": "", "dataset": "synthetic", "canvas_mode": "center"}
    write_maps(generation_path(folder, 0), np.arange(rows), labels, maps, meta)
    write_pointer(folder, 0, keep=2)
    pending_dir(folder, 1).mkdir()
    new = rng.random((rows, grid, grid), dtype=np.float32).astype(np.float16)
    write_maps(pending_dir(folder, 1) / "shard-0-of-1.arrow", np.arange(rows), labels, new,
               {**meta, "generation": 1, "base": 0, "momentum": 0.1})
    t = time.perf_counter()
    publish_generation(folder)
    publish_s = time.perf_counter() - t
    size = generation_path(folder, 1).stat().st_size
    cache = ForegroundCache(folder)
    assert cache.generation == 1
    lat = []
    for _ in range(gathers):
        idx = rng.integers(0, rows, 256)
        t = time.perf_counter()
        cache.gather(idx)
        lat.append(time.perf_counter() - t)
    return {"rows": rows, "grid": grid, "publish_s": publish_s, "bytes_on_disk": size,
            "gather_256_ms_median": 1e3 * statistics.median(lat),
            "gather_256_ms_p95": 1e3 * float(np.percentile(lat, 95))}


def in_loop_vs_pass(images: int, folder: Path, repeats: int, workers: int, device: str = "auto",
                    canvas: int = 40, batch_size: int = 64, pass_batch_size: int = 128) -> dict:
    """Seconds per rebuild of ``images`` bench photos: in-loop overhead vs separate pass (medians)."""
    device = choose_device(device)
    index = make_bench_folder(default_bench_folder(images), images)
    torch.manual_seed(0)
    model = build_model("cnn32", index.num_classes, width=0.5).to(device)
    # The training loader's batches: canvases already decoded (their decode is the epoch's, not the rebuild's).
    rows = np.arange(len(index))
    t0 = time.process_time()
    batches = [(torch.stack([decode_canvas(index.abspath(int(i)), canvas) for i in b]).to(device),
                torch.from_numpy(b).to(device)) for b in np.array_split(rows, -(-len(rows) // batch_size))]
    decode_cpu_s = time.process_time() - t0           # the decoding the in-loop rebuild saves
    common = dict(canvas=canvas, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def loop(cache: Path) -> None:
        writer = GenerationWriter(cache, model, index, **common)
        for x, r in batches:
            writer.add_canvases(x, r)
        rebuild_cache(cache, model, index, writer=writer, **common)

    def separate(cache: Path) -> None:
        rebuild_cache(cache, model, index, batch_size=pass_batch_size, num_workers=workers, device=device,
                      progress=False, **common)

    def cpu_seconds() -> float:
        # this process's threads and its finished children (the pass's decoding workers, joined per pass)
        return time.process_time() + resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime \
            + resource.getrusage(resource.RUSAGE_CHILDREN).ru_stime

    times = {"loop": ([], []), "separate": ([], [])}   # wall, CPU seconds
    model.train()                                     # as in the training loop; the CAMs switch to eval
    for i in range(repeats + 1):                      # the first round warms up (allocator, page cache)
        for fn in (loop, separate):
            cache = folder / f"{fn.__name__}-{i}"
            init_cache(cache, index, grid=8)
            c = cpu_seconds()
            t = _timed(lambda: fn(cache), sync)
            if i:
                times[fn.__name__][0].append(t)
                times[fn.__name__][1].append(cpu_seconds() - c)
    (t_loop, c_loop), (t_pass, c_pass) = ([statistics.median(v) for v in times[k]] for k in ("loop", "separate"))
    return {"images": len(index), "arch": "cnn32", "width": 0.5, "canvas": canvas, "batch_size": batch_size,
            "pass_batch_size": pass_batch_size, "pass_workers": workers, "device": device.type, "repeats": repeats,
            "in_loop_s": t_loop, "pass_s": t_pass, "in_loop_vs_pass_ratio": t_loop / t_pass,
            "decode_cpu_s": decode_cpu_s, "in_loop_cpu_s": c_loop, "pass_cpu_s": c_pass,
            "in_loop_vs_pass_cpu_ratio": c_loop / c_pass}


def bench_cache(args) -> dict:
    pre = precompute_vs_inference(args.arch, args.canvas, args.batch_size, args.grid, args.repeats,
                                  device=args.device)
    tmp = Path(tempfile.mkdtemp(prefix="backmix-bench-cache-", dir=args.dir))
    try:
        pub = publish_and_gather(args.rows, args.grid, tmp / "cache")
        regen = (in_loop_vs_pass(args.loop_images, tmp / "regen", args.repeats, args.workers, device=args.device)
                 if args.loop_images else None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"precompute_vs_inference_ratio": pre["precompute_vs_inference_ratio"], "precompute": pre,
              "publish": pub, "in_loop_vs_pass": regen, "machine": {**machine(), "torch_threads": torch.get_num_threads()},
              "command": "backmix bench cache " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                  if k in ("rows", "grid", "arch", "canvas", "batch_size", "repeats", "device", "loop_images",
                           "workers"))}
    rows = [
        ("precompute vs inference", f"{pre['precompute_vs_inference_ratio']:.3f}", ">= 0.9",
         f"{pre['precompute_images_per_s']:.0f} vs {pre['inference_images_per_s']:.0f} img/s, "
         f"{pre['arch']} {pre['canvas']}px batch {pre['batch_size']} on {pre['device']}"),
        (f"publish {pub['rows']:,} rows", f"{pub['publish_s']:.2f} s", "< 10 s", f"grid {pub['grid']}"),
        ("size on disk", f"{pub['bytes_on_disk'] / 1e6:.1f} MB", "< 200 MB", "float16 maps"),
        ("gather 256 indices", f"{pub['gather_256_ms_median']:.3f} ms", "< 1 ms",
         f"p95 {pub['gather_256_ms_p95']:.3f} ms"),
    ]
    if regen:
        rows.append(("in-loop rebuild vs pass", f"{regen['in_loop_vs_pass_ratio']:.3f}", "<= 0.5",
                     f"{regen['in_loop_s']:.2f} s added to the epoch vs {regen['pass_s']:.2f} s pass, "
                     f"(CPU time {regen['in_loop_vs_pass_cpu_ratio']:.3f}: {regen['in_loop_cpu_s']:.1f} vs "
                     f"{regen['pass_cpu_s']:.1f} s; decoding {regen['decode_cpu_s']:.1f} s of it), "
                     f"{regen['images']} bench photos, "
                     f"cnn32 {regen['canvas']}px on {regen['device']}"))
    width = [max(len(r[i]) for r in rows + [("figure", "value", "target", "notes")]) for i in range(4)]
    for r in [("figure", "value", "target", "notes")] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, width)))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result
