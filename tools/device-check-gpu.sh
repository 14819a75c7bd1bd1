#!/usr/bin/env bash
# Issue 31's device check, on one NVIDIA GPU: karpathy/nanoGPT's train.py with torch.compile on
# its config/train_shakespeare_char.py, then randygpt's experiments/shakespeare_char.cfg with
# the same iterations and evaluation (every 250 iterations over 200 batches), each in its own
# process with cold caches; then randygpt's train step in its compute variants (bench
# --variants). Writes both logs, randygpt's summary and metrics, the variants and gpu.md (the
# table) to $OUT.
#   tools/device-check-gpu.sh [ITERS [EVAL_INTERVAL [EVAL_ITERS]]]   defaults 5000 250 200
# Needs data/tinyshakespeare.txt and, for the nanoGPT side, .device/nanogpt (carry both):
# nanoGPT's source (`git --git-dir=NANOGPT_GIT --work-tree=.device/nanogpt checkout -f HEAD
# -- .`) with data/shakespeare_char/{train,val}.bin made by its prepare.py from a copy of
# data/tinyshakespeare.txt as its input.txt.
# Env: PARTS (`runs`, `variants` or both, the default: `runs,variants`); PYTHON; DEVICE=cpu
# rehearses on a machine without a GPU (nanoGPT uncompiled, float32);
# NANOGPT_LIMIT_S, RANDYGPT_LIMIT_S, VARIANTS_LIMIT_S (each part's limit, seconds); STEPS
# (the variants' timed steps, 30); SHAPE_FLAGS, flags both sides take (e.g. "--n_layer=2
# --n_embd=64 --block_size=32"), to rehearse at a shape the CPU trains quickly.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${OUT:-/tmp/device-check-gpu}
mkdir -p "$out"
python=${PYTHON:-python3}
iters=${1:-5000} eval_interval=${2:-250} eval_iters=${3:-200}
read -r -a shape <<< "${SHAPE_FLAGS:-}"
device=${DEVICE:-cuda}
scratch=$(mktemp -d)
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export RANDYGPT_CACHE="$scratch/cache" TORCHINDUCTOR_CACHE_DIR="$scratch/inductor"  # Cold.
start=$(date +%s)
say() { echo "[$(( $(date +%s) - start ))s] $*" >&2; }
ended() {  # ended T0: the last command's exit status and the seconds since T0.
  local rc=$?
  echo "status $rc wall_s $(awk -v t0="$1" -v t1="$(date +%s.%N)" 'BEGIN { print t1 - t0 }')"
}
[ -f data/tinyshakespeare.txt ] || { echo "data/tinyshakespeare.txt is missing: carry it" >&2; exit 1; }
{ date -u; nvidia-smi -L 2>/dev/null; lscpu 2>/dev/null | grep "Model name"
  "$python" -c 'import sys, jax, torch; print("python", sys.version.split()[0], "| jax",
jax.__version__, jax.devices(), "| torch", torch.__version__)'; } > "$out/machine.txt" 2>&1
cat "$out/machine.txt" >&2

runs() {
# nanoGPT: its own train.py and config, run from a copy; the wrapper adds the peak memory.
nanogpt=(--max_iters="$iters" --eval_interval="$eval_interval" --eval_iters="$eval_iters"
         --out_dir="$scratch/nanogpt-out" ${shape[@]+"${shape[@]}"})
[ "$device" = cpu ] && nanogpt+=(--device=cpu --compile=False --dtype=float32)
if [ -f .device/nanogpt/train.py ] && [ -f .device/nanogpt/data/shakespeare_char/train.bin ]; then
  cp -r .device/nanogpt "$scratch/nanogpt"
  say "nanoGPT: ${nanogpt[*]}"
  t0=$(date +%s.%N)
  (cd "$scratch/nanogpt" && timeout "${NANOGPT_LIMIT_S:-300}" "$python" - \
      config/train_shakespeare_char.py "${nanogpt[@]}" <<'PY'
import runpy, sys
import torch
sys.argv = ["train.py", *sys.argv[1:]]
try:
  runpy.run_path("train.py", run_name="__main__")
finally:
  if torch.cuda.is_available():
    print(f"peak_gpu_bytes {torch.cuda.max_memory_allocated()}")
PY
  ) > "$out/nanogpt.log" 2>&1
  ended "$t0" >> "$out/nanogpt.log"
  tail -n 3 "$out/nanogpt.log" >&2
else
  say "nanoGPT: left out (.device/nanogpt is not carried)"
fi

# randygpt: the preset, the same iterations and evaluation.
say "randygpt: experiments/shakespeare_char.cfg --iters=$iters"
t0=$(date +%s.%N)
timeout "${RANDYGPT_LIMIT_S:-240}" "$python" -m randygpt.main \
    --flagfile=experiments/shakespeare_char.cfg --iters="$iters" \
    --eval_interval="$eval_interval" --eval_iters="$eval_iters" --workdir="$scratch/rg" \
    ${shape[@]+"${shape[@]}"} \
    > "$out/randygpt.log" 2>&1
ended "$t0" >> "$out/randygpt.log"
cp "$scratch/rg/summary.json" "$scratch/rg/metrics.jsonl" "$out/" 2>/dev/null
tail -n 3 "$out/randygpt.log" >&2
"$python" tools/gpu_table.py "$out" | tee "$out/gpu.md" >&2
}

variants() {
say "variants of the train step"
timeout "${VARIANTS_LIMIT_S:-90}" "$python" -m randygpt.bench \
    --flagfile=experiments/shakespeare_char.cfg --steps="${STEPS:-30}" --warmup_steps=3 \
    ${shape[@]+"${shape[@]}"} \
    --variants=compute_dtype=float32/attention=einsum,compute_dtype=bfloat16/attention=einsum,compute_dtype=bfloat16/attention=cudnn \
    > "$out/variants.log" 2>&1
grep '^|' "$out/variants.log" | tee -a "$out/gpu.md" >&2
}

case ",${PARTS:-runs,variants}," in *,runs,*) runs ;; esac
case ",${PARTS:-runs,variants}," in *,variants,*) variants ;; esac
say "total $(( $(date +%s) - start )) s"
rm -rf "$scratch"
