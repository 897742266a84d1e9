#!/usr/bin/env bash
# The GPU check, one command: bash scripts/gpu-check.sh OUTDIR [--cpu]
#
# For a GPU machine without network that has torch, torchvision, timm, pyarrow, scikit-learn,
# scikit-image, matplotlib, psutil, tqdm and pytest but maybe no DALI, FFCV, Ray or safetensors.
# Run from anywhere; it works on the repository it sits in. Sized to finish in under 8 minutes on
# one H200 with 16 cores (each step has a time limit; a step that fails is recorded, the rest run):
#   (a) install backmix without network: pip install --no-index --no-deps --no-build-isolation -e .
#       (--no-deps: the base dependencies are on the machine or not needed; a wheel in a wheels/
#       folder in or beside the tree is installed first, without network, for what is missing)
#   (b) the CUDA tests: tests/test_cuda.py (every torch path, and the torchvision backend's nvjpeg
#       decode, on the GPU held to its CPU result) -> OUTDIR/test-cuda.log
#   (c) backmix bench loader --device cuda for reference, torchvision (and dali if importable) at
#       canvas 256, 224 RandomResizedCrop, batch 256 -> OUTDIR/loader-gpu.json;
#       how far nvjpeg's canvases are from the CPU decode -> OUTDIR/decode-gpu.json;
#       backmix bench cache --device cuda (CAM precompute vs inference, in-loop rebuild vs the
#       separate pass) -> OUTDIR/cache-gpu.json; backmix bench train (resnet50 at 224, bf16, channels-last,
#       batch 256, torchvision backend: the plain baseline vs each BackMix recipe, whole training
#       steps) -> OUTDIR/train-gpu.json. Each JSON names the GPU ("gpu").
#   (d) nccl: under torchrun --nproc_per_node 1, a one-GPU NCCL process group, an all-reduce, and two
#       DDP training steps with an in-loop cache rebuild published at the end -> OUTDIR/ddp-gpu.json
# OUTDIR/summary.txt: each step's exit status (or "skipped" and why). Exit status: 0 when every step
# that ran passed.
#
# --cpu: a dry run of every step that needs no CUDA, at tiny sizes, so the script is known to work
# before it meets a GPU (tests/test_gpu_check.py runs it): (a) builds the wheel without network into
# a scratch folder instead of installing into the running environment, (b) collects the CUDA tests
# (they skip), (c) runs the benchmarks on the CPU (reference and torchvision), (d) runs the NCCL step's
# script on gloo and the CPU (step ddp-gloo) and records nccl as skipped. Same files, with
# "dry_run": true and "gpu": null.
set -uo pipefail

usage() { echo "usage: bash scripts/gpu-check.sh OUTDIR [--cpu]" >&2; exit 2; }
[ $# -ge 1 ] && [ $# -le 2 ] || usage
OUT=$1
DRY=0
if [ $# = 2 ]; then [ "$2" = --cpu ] && DRY=1 || usage; fi
case "$OUT" in -*) usage ;; esac

REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$OUT" || { echo "backmix: error: cannot create $OUT" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
: > "$OUT/summary.txt"
FAILED=0

step() {   # step NAME SECONDS COMMAND...: run it with a time limit, record its status
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name"
  timeout "$limit" "$@"
  local rc=$?
  echo "$name: exit $rc, $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
  [ $rc = 0 ] || FAILED=1
}

skip() {   # skip NAME REASON: record a step that cannot run here, and why
  echo "$1: skipped, $2" | tee -a "$OUT/summary.txt"
}

cd "$REPO"
if [ $DRY = 1 ]; then
  DEVICE=cpu
  # The benchmark photo folder goes to the scratch folder, not the user's cache.
  export XDG_CACHE_HOME="$SCRATCH/cache"
  step install 120 "$PY" -m pip wheel -q --no-index --no-deps --no-build-isolation -w "$SCRATCH/wheel" .
  LOADER=(--images 16 --batch-size 8 --batches 2 --warmup 1 --repeat 1 --canvas 64 --crop 56 --workers 1)
  CACHE=(--rows 2000 --arch cnn32 --canvas 40 --batch-size 16 --repeats 1 --loop-images 16 --workers 1)
  DECODE_IMAGES=16
  TRAIN=(--images 16 --batch-size 4 --steps 2 --warmup 1 --rounds 1 --arch cnn32 --canvas 40 --crop 32 --workers 1
         --backend reference,torchvision)
else
  DEVICE=cuda
  WORKERS=$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))
  wheels=()
  for d in "$REPO/wheels" "$REPO/../wheels"; do [ -d "$d" ] && wheels+=("$d"/*.whl); done
  if [ ${#wheels[@]} -gt 0 ]; then
    step wheels 60 "$PY" -m pip install -q --no-index --no-deps "${wheels[@]}"
  fi
  step install 60 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .
  LOADER=(--images 2048 --batch-size 256 --batches 24 --warmup 4 --repeat 2 --canvas 256 --crop 224
          --workers "$WORKERS")
  CACHE=(--arch resnet50 --canvas 224 --batch-size 256 --repeats 5 --loop-images 2048 --workers "$WORKERS")
  DECODE_IMAGES=2048
  # 8 batches of 256 an epoch: 2 warm-up steps and 5 timed ones fit in one
  TRAIN=(--images 2048 --batch-size 256 --steps 5 --warmup 2 --rounds 2 --arch resnet50 --canvas 256 --crop 224
         --augment rrc --amp bf16 --workers "$WORKERS" --backend torchvision)
fi

step cuda-tests 200 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py > "$OUT/test-cuda.log" 2>&1
tail -n 3 "$OUT/test-cuda.log"

BACKENDS=reference,torchvision
# DALI where it is installed, on the GPU only (the dry run keeps to the loaders this check is about).
[ $DRY = 0 ] && "$PY" -c "import nvidia.dali" 2>/dev/null && BACKENDS=$BACKENDS,dali
step bench-loader 150 "$PY" -m backmix bench loader --device "$DEVICE" --backend "$BACKENDS" --augment rrc \
  "${LOADER[@]}" --json "$OUT/loader-gpu.json"

step decode-difference 45 "$PY" - "$DECODE_IMAGES" "$DEVICE" "$OUT/decode-gpu.json" <<'PYEOF'
import json, sys
import numpy as np
from backmix.bench.folders import default_bench_folder, make_bench_folder
from backmix.bench.decode_difference import decode_difference
n, device, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
index = make_bench_folder(default_bench_folder(n), n)
report = {"what": "|canvas of the torchvision backend's decode on DEVICE - reference CPU canvas|, levels 0-255",
          "results": [decode_difference(index, np.arange(len(index)), 224, mode, device)
                      for mode in ("center", "stretch")]}
open(out, "w").write(json.dumps(report, indent=2) + "\n")
print(report["results"])
PYEOF

step bench-cache 120 "$PY" -m backmix bench cache --device "$DEVICE" "${CACHE[@]}" --json "$OUT/cache-gpu.json"

# What each recipe costs a whole training step (AMP and channels-last on CUDA, as `backmix train`).
step bench-train 120 "$PY" -m backmix bench train --device "$DEVICE" "${TRAIN[@]}" --json "$OUT/train-gpu.json"

# One rank, one GPU: the NCCL process group, an all-reduce, and two DDP steps whose in-loop rebuild
# publishes generation 1, as `backmix train` does under torchrun (the dry run: the same on gloo).
cat > "$SCRATCH/ddp-check.py" <<'PYEOF'
import json, os, sys
from pathlib import Path
import numpy as np
import torch
import torch.distributed as dist
import backmix
from backmix.models import build_model
from backmix.osr_data.split_folder import write_split
backend, device, out = sys.argv[1], sys.argv[2], sys.argv[4]
root = Path(sys.argv[3])
if device == "cuda":
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
dist.init_process_group(backend)
total = torch.full((4,), float(dist.get_rank() + 1), device=device)
dist.all_reduce(total)
assert total.tolist() == [1.0] * 4, total
rng = np.random.default_rng(0)
for split, per_class in (("train", 8), ("test", 4)):
    labels = np.repeat(np.arange(3), per_class)
    write_split(root / split, rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8), labels,
                ("ant", "bee", "cat"))
data = backmix.open_set_data(root, split="ant,bee")
train = backmix.loader(data, cache=root / "cache", batch_size=8, canvas=40, crop=32, num_workers=0, device=device)
torch.manual_seed(0)
model = build_model("cnn32", data.num_known, width=0.25).to(device)
net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if device == "cuda" else None)
opt = torch.optim.SGD(net.parameters(), lr=0.05)
losses = []
with backmix.rebuilding(train, model, progress=False) as rebuild:
    for batch in train:
        rebuild.record(batch)
        x, y = batch.inputs()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
assert len(losses) == 2 and all(np.isfinite(losses)), losses
train.maps.refresh()
assert rebuild.generation == 1 and train.maps.generation == 1
report = {"backend": dist.get_backend(), "device": device, "world": dist.get_world_size(), "all_reduce": total.tolist(),
          "steps": len(losses), "losses": losses, "published_generation": rebuild.generation}
open(out, "w").write(json.dumps(report, indent=2) + "\n")
print(report)
dist.destroy_process_group()
PYEOF
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node 1)   # a free port
if [ $DRY = 1 ]; then
  step ddp-gloo 120 "${TORCHRUN[@]}" "$SCRATCH/ddp-check.py" gloo cpu "$SCRATCH/ddp-data" "$OUT/ddp-gpu.json"
  skip nccl "no CUDA in the --cpu dry run (its script ran on gloo as ddp-gloo)"
elif ! "$PY" -c "import sys, torch; sys.exit(not (torch.cuda.is_available() and torch.distributed.is_nccl_available()))"; then
  skip nccl "torch sees no CUDA device or has no NCCL"
else
  step nccl 150 "${TORCHRUN[@]}" "$SCRATCH/ddp-check.py" nccl cuda "$SCRATCH/ddp-data" "$OUT/ddp-gpu.json"
fi

# Every report names the GPU it ran on and whether this was the --cpu dry run.
"$PY" - "$OUT" "$DRY" <<'PYEOF'
import json, pathlib, sys
from backmix.bench.machine import machine
import torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() and sys.argv[2] == "0" else None
for path in sorted(pathlib.Path(sys.argv[1]).glob("*-gpu.json")):
    report = json.loads(path.read_text())
    report.update(gpu=gpu, dry_run=sys.argv[2] == "1", host=machine())
    path.write_text(json.dumps(report, indent=2) + "\n")
PYEOF

echo "== summary ($OUT)"
cat "$OUT/summary.txt"
exit $FAILED
