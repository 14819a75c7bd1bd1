#!/usr/bin/env bash
# Both device checks in one call of a lent GPU machine (16 cores), within TOTAL_S seconds
# (default 570: the device tool's command limit is 600): issue 31's GPU runs
# (tools/device-check-gpu.sh: nanoGPT and randygpt, 5000 iterations each), then issue 30's
# core scaling (tools/device-check-cores.sh) in the time left, then the GPU step's variants.
# Each part's files are packed into one archive in $OUT (the tool returns at most 8 files);
# summary.md gathers the tables. Carry data/tinyshakespeare.txt and .device (nanoGPT).
#   tools/device-check.sh [ITERS]    (a rehearsal: DEVICE=cpu SHAPE_FLAGS=... and few ITERS)
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-/tmp/device-check}
total=${TOTAL_S:-570}
start=$(date +%s)
left() { echo $(( total - ($(date +%s) - start) - ${1:-0} )); }
pack() {  # pack NAME: $OUT/NAME/ into $OUT/NAME.tgz, its tables into summary.md.
  cat "$out/$1"/*.md >> "$out/summary.md" 2>/dev/null
  tar -czf "$out/$1.tgz" -C "$out" "$1" && rm -rf "${out:?}/$1"
}
mkdir -p "$out"

OUT="$out/gpu" PARTS=runs NANOGPT_LIMIT_S=${NANOGPT_LIMIT_S:-220} \
  RANDYGPT_LIMIT_S=${RANDYGPT_LIMIT_S:-170} "$root/tools/device-check-gpu.sh" "$@"
pack gpu

# The core scaling in what is left, less 70 s for the variants: the wide part first.
budget=$(left 70)
wide=$(( budget * 55 / 100 )) narrow=$(( budget * 25 / 100 ))
brackets=$(( budget - wide - narrow - 10 ))
OUT="$out/cores" WIDE_LIMIT_S=$(( wide > 0 ? wide : 0 )) \
  NARROW_LIMIT_S=$(( narrow > 0 ? narrow : 0 )) BRACKETS_LIMIT_S=$(( brackets > 0 ? brackets : 0 )) \
  "$root/tools/device-check-cores.sh"
pack cores

limit=$(left 5)
if [ "$limit" -gt 20 ]; then
  OUT="$out/variants" PARTS=variants VARIANTS_LIMIT_S=$limit "$root/tools/device-check-gpu.sh"
  pack variants
fi
echo "device-check: $(( $(date +%s) - start )) s" | tee -a "$out/summary.md" >&2
