#!/usr/bin/env bash
# Where the DALI loader's CPU time goes, native threads included (py-spy samples Python threads only,
# and DALI's work runs on its own C++ threads): `perf record` of one `bench peers` measurement each of
# stock DALI and backmix's DALI backend with BackMix off, on and on+clean, then one table of the
# functions that take the most samples, side by side.
#
#   bash scripts/profile-dali.sh OUT [DATA]     (DATA: an image folder; default: the bench photos)
#
# Needs `perf` (linux-tools) allowed to sample this user's processes (kernel.perf_event_paranoid <= 2).
# Writes OUT/<config>.perf.txt (perf report, flat, per symbol) and OUT/profile.md (the table).
set -euo pipefail
usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }
if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then usage; exit 0; fi
if [ -z "${1:-}" ]; then usage >&2; exit 2; fi
OUT=$1
DATA=${2:-${XDG_CACHE_HOME:-$HOME/.cache}/backmix/bench-photos-1024}
BATCHES=${BATCHES:-64}
command -v perf >/dev/null || { echo "profile-dali: perf is not installed (linux-tools)" >&2; exit 2; }
[ -d "$DATA" ] || { echo "profile-dali: no image folder at $DATA (run 'backmix bench peers' once to make it)" >&2; exit 2; }
mkdir -p "$OUT"
for config in stock off on on+clean; do
  if [ "$config" = stock ]; then args=(--loader stock); else args=(--loader dali --mode "$config"); fi
  echo "profile-dali: $config ($BATCHES batches)" >&2
  perf record -q -F 499 -g -o "$OUT/$config.perf" -- python -m backmix.bench.peer_run --family dali \
    "${args[@]}" --data "$DATA" --batches "$BATCHES" > "$OUT/$config.json" 2> "$OUT/$config.err" \
    || { echo "profile-dali: $config failed: $(grep -v Warning "$OUT/$config.err" | tail -1)" >&2; exit 1; }
  perf report -i "$OUT/$config.perf" --no-children --sort dso,sym -n --stdio 2>/dev/null \
    | grep -v '^#' | grep '%' | grep -v -- '--' > "$OUT/$config.perf.txt"
  rm -f "$OUT/$config.perf"
done
python - "$OUT" <<'PY'
import json, re, sys
from pathlib import Path
out = Path(sys.argv[1])
configs = ["stock", "off", "on", "on+clean"]
samples, rate = {}, {}
for c in configs:
    rate[c] = json.loads((out / f"{c}.json").read_text())["images_per_s"]
    table = {}
    for line in (out / f"{c}.perf.txt").read_text().splitlines():
        m = re.match(r"\s*[\d.]+%\s+(\d+)\s+(\S+)\s+\[.\]\s+(.*)", line)
        if m:
            table[f"{m.group(3)[:70]} ({m.group(2)})"] = table.get(f"{m.group(3)[:70]} ({m.group(2)})", 0) + int(m.group(1))
    samples[c] = table
top = sorted({k for t in samples.values() for k in t}, key=lambda k: -max(t.get(k, 0) for t in samples.values()))[:20]
rows = ["| function (library) | " + " | ".join(configs) + " |", "|---|" + "---:|" * len(configs)]
rows.append("| images/s of the profiled run | " + " | ".join(f"{rate[c]:.0f}" for c in configs) + " |")
rows.append("| samples, all functions | " + " | ".join(str(sum(samples[c].values())) for c in configs) + " |")
rows += ["| " + k.replace("|", "\\|") + " | " + " | ".join(str(samples[c].get(k, 0)) for c in configs) + " |" for k in top]
text = "\n".join(rows) + "\n"
(out / "profile.md").write_text(text)
print(text)
PY
