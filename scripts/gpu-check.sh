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
#       separate pass) -> OUTDIR/cache-gpu.json. Each JSON names the GPU ("gpu").
# OUTDIR/summary.txt: each step's exit status. Exit status: 0 when every step passed.
#
# --cpu: a dry run of every step that needs no CUDA, at tiny sizes, so the script is known to work
# before it meets a GPU (tests/test_gpu_check.py runs it): (a) builds the wheel without network into
# a scratch folder instead of installing into the running environment, (b) collects the CUDA tests
# (they skip), (c) runs the benchmarks on the CPU (reference and torchvision). Same files, with
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

cd "$REPO"
if [ $DRY = 1 ]; then
  DEVICE=cpu
  # The benchmark photo folder goes to the scratch folder, not the user's cache.
  export XDG_CACHE_HOME="$SCRATCH/cache"
  step install 120 "$PY" -m pip wheel -q --no-index --no-deps --no-build-isolation -w "$SCRATCH/wheel" .
  LOADER=(--images 16 --batch-size 8 --batches 2 --warmup 1 --repeat 1 --canvas 64 --crop 56 --workers 1)
  CACHE=(--rows 2000 --arch cnn32 --canvas 40 --batch-size 16 --repeats 1 --loop-images 16 --workers 1)
  DECODE_IMAGES=16
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
from backmix.osr_data.benchdata import default_bench_folder, make_bench_folder
from backmix.pipeline.device_decode import decode_difference
n, device, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
index = make_bench_folder(default_bench_folder(n), n)
report = {"what": "|canvas of the torchvision backend's decode on DEVICE - reference CPU canvas|, levels 0-255",
          "results": [decode_difference(index, np.arange(len(index)), 224, mode, device)
                      for mode in ("center", "stretch")]}
open(out, "w").write(json.dumps(report, indent=2) + "\n")
print(report["results"])
PYEOF

step bench-cache 120 "$PY" -m backmix bench cache --device "$DEVICE" "${CACHE[@]}" --json "$OUT/cache-gpu.json"

# Every report names the GPU it ran on and whether this was the --cpu dry run.
"$PY" - "$OUT" "$DRY" <<'PYEOF'
import json, pathlib, sys
from backmix.pipeline.bench import machine
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
