#!/usr/bin/env bash
# Issue 30's device check: randygpt's automatic CPU placement against the faster PyTorch peer
# on the lent machine's cores (16), in ~7 minutes with a cold compilation cache:
#   16 cores: the tiny, default and medium shapes (randygpt/bench/shapes.py);
#   4 and 8 cores: the default shape;
#   then, where BRACKETS_LIMIT_S allows, 16 cores at the default shape with the manual
#   settings that bracket the automatic one (half and double its devices);
# each timing a process pinned to the first k cores with k threads, 20 timed steps, two
# interleaved rounds (python -m randygpt.bench --cores). Writes machine.txt, the tables
# (cores.md) and their JSON and logs to $OUT.
#   tools/device-check-cores.sh [WIDE_CORES [NARROW_CORES]]   defaults 16 and 4,8
# Needs data/tinyshakespeare.txt (carry it). Leaves nanoGPT out (its source is outside the
# repository: the torch_reference peer is the faster at these shapes, all with dropout)
# unless .device/nanogpt holds a nanoGPT checkout with data/shakespeare_char prepared and
# .device/nanogpt-bench.sh the script that times it. Env: PYTHON, STEPS, ROUNDS, and
# WIDE_LIMIT_S / NARROW_LIMIT_S / BRACKETS_LIMIT_S (each part's time limit in seconds; 0
# skips the part; brackets default 0).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${OUT:-/tmp/device-check-cores}
mkdir -p "$out"
python=${PYTHON:-python3}
steps=${STEPS:-20} rounds=${ROUNDS:-2}
export JAX_PLATFORMS=cpu PYTHONUNBUFFERED=1 PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
RANDYGPT_CACHE=$(mktemp -d)  # Cold: every shape compiles on its first process.
export RANDYGPT_CACHE
start=$(date +%s)
say() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a "$out/cores.md" >&2; }

{
  date -u; uname -a; nproc; lscpu 2>/dev/null | grep -E "Model name|^CPU\(s\)|Thread|Core|Socket"
  "$python" - <<'PY'
import sys, jax, torch
from randygpt.runtime import cores
print("python", sys.version.split()[0], "| jax", jax.__version__, "| torch", torch.__version__)
print("usable:", cores.usable())
PY
} > "$out/machine.txt" 2>&1 || { cat "$out/machine.txt"; echo "the imports failed" >&2; exit 1; }
cat "$out/machine.txt" >&2
[ -f data/tinyshakespeare.txt ] || { echo "data/tinyshakespeare.txt is missing: carry it" >&2; exit 1; }

usable=$("$python" -c 'from randygpt.runtime import cores; print(cores.usable().cpus)')
wide=${1:-16}
[ "$wide" -le "$usable" ] || wide=$usable
narrow=$(echo "${2:-4,8}" | tr , '\n' | awk -v w="$wide" '$1 < w' | paste -sd, -)

nanogpt=(--nanogpt_iters=0)
if [ -x .device/nanogpt-bench.sh ] && [ -f .device/nanogpt/train.py ]; then
  tmp=$(mktemp -d)  # The script's layout: $TMPDIR/nanogpt and a venv whose python has torch.
  cp -r .device/nanogpt "$tmp/nanogpt" && mkdir -p "$tmp/nanogpt-venv/bin"
  printf '#!/bin/sh\nexec "%s" "$@"\n' "$(command -v "$python")" > "$tmp/nanogpt-venv/bin/python"
  chmod +x "$tmp/nanogpt-venv/bin/python"
  export TMPDIR=$tmp
  nanogpt=(--nanogpt_iters=20 --nanogpt_script="$root/.device/nanogpt-bench.sh")
  say "nanoGPT: included (.device/nanogpt)"
else
  say "nanoGPT: left out (its source is not carried); the peer is torch_reference"
fi

common=(--flagfile=experiments/shakespeare.cfg --data=data/tinyshakespeare.txt
        --eval_platform=cpu --steps="$steps" --warmup_steps=2 --shape_repeats="$rounds"
        "${nanogpt[@]}")
part() {  # part NAME LIMIT_S SHAPES CORES [BENCH FLAGS...]
  local name=$1 limit=$2 shapes=$3 counts=$4
  shift 4
  [ "$limit" -gt 0 ] || { say "$name: skipped (no time left)"; return; }
  say "$name: --shapes=$shapes --cores=$counts $*, limit $limit s"
  timeout "$limit" "$python" -m randygpt.bench "${common[@]}" --shapes="$shapes" \
    --cores="$counts" --json "$@" > "$out/$name.out" 2> "$out/$name.log"
  local rc=$?
  grep '^|' "$out/$name.out" | tee -a "$out/cores.md" >&2
  grep '^\[' "$out/$name.out" > "$out/$name.json"
  [ $rc -eq 0 ] || say "$name ended with status $rc; its rounds so far:"
  grep '^round' "$out/$name.log" | tee -a "$out/cores.md" >&2  # Each round: the spread.
  say "$name done"
}
part wide "${WIDE_LIMIT_S:-300}" tiny,default,medium "$wide" --nocore_brackets
[ -n "$narrow" ] && part narrow "${NARROW_LIMIT_S:-120}" default "$narrow" --nocore_brackets
part brackets "${BRACKETS_LIMIT_S:-0}" default "$wide" --core_brackets
say "total $(( $(date +%s) - start )) s"
rm -rf "$RANDYGPT_CACHE"
