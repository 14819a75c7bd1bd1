#!/usr/bin/env bash
# Times karpathy/nanoGPT's own train.py (PyTorch eager, on the CPU) at one shape on Tiny
# Shakespeare: the median ms/iteration from its 10th iteration on. It is the nanoGPT column of
# `./launch.sh bench --shapes=...`, which runs it (and passes --nanogpt_git on as NANOGPT_GIT).
#   tools/nanogpt-bench.sh N_LAYER N_HEAD N_EMBD BLOCK BATCH DROPOUT [ITERS]   (ITERS: 30)
#   tools/nanogpt-bench.sh --prepare      only check out nanoGPT and write its data
# nanoGPT is fetched only when asked: NANOGPT_GIT (a URL such as
# https://github.com/karpathy/nanoGPT, a clone, or a bare git directory) is cloned once into
# NANOGPT_DIR (default ${RANDYGPT_CACHE:-~/.cache/randygpt}/nanogpt); later runs use that
# checkout. NANOGPT_PYTHON: an interpreter with torch and numpy (default the repository's
# .venv). NANOGPT_TEXT: the text (default the repository's data/tinyshakespeare.txt).
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
dir=${NANOGPT_DIR:-${RANDYGPT_CACHE:-$HOME/.cache/randygpt}/nanogpt}
text=${NANOGPT_TEXT:-$root/data/tinyshakespeare.txt}
python=${NANOGPT_PYTHON:-$root/.venv/bin/python}
dataset=randygpt_shakespeare_char  # Written by this script, beside nanoGPT's own datasets.

fail() {
  echo "nanogpt-bench: $*" >&2
  exit 1
}

checkout() {
  [ -f "$dir/train.py" ] && return 0
  [ -n "${NANOGPT_GIT:-}" ] || fail "nanoGPT is not checked out in $dir: pass" \
    "--nanogpt_git=https://github.com/karpathy/nanoGPT (or a local clone) once to fetch it," \
    "or --nanogpt_iters=0 to leave nanoGPT out"
  local depth=(--depth 1)
  [ -d "$NANOGPT_GIT" ] && depth=()  # A local clone copies whole; --depth would only warn.
  mkdir -p "$(dirname "$dir")"
  rm -rf "$dir.partial"
  git clone --quiet ${depth[@]+"${depth[@]}"} "$NANOGPT_GIT" "$dir.partial" ||
    fail "could not clone nanoGPT from $NANOGPT_GIT"
  mv "$dir.partial" "$dir"
}

# nanoGPT's character-level data, made here as its data/shakespeare_char/prepare.py makes it
# (sorted characters, the first 90% for training) but from the checked text, without a download.
prepare_data() {
  [ -f "$dir/data/$dataset/meta.pkl" ] && return 0
  [ -f "$text" ] || fail "no text at $text: ./launch.sh experiments/shakespeare.cfg" \
    "downloads Tiny Shakespeare there (or set NANOGPT_TEXT)"
  mkdir -p "$dir/data/$dataset"
  "$python" - "$text" "$dir/data/$dataset" <<'EOF'
import pickle, sys
import numpy as np
text = open(sys.argv[1], encoding="utf-8").read()
chars = sorted(set(text))
stoi = {c: i for i, c in enumerate(chars)}
ids = np.array([stoi[c] for c in text], dtype=np.uint16)
split = int(len(ids) * 0.9)
ids[:split].tofile(f"{sys.argv[2]}/train.bin")
ids[split:].tofile(f"{sys.argv[2]}/val.bin")
with open(f"{sys.argv[2]}/meta.pkl", "wb") as f:  # Written last: it marks the data complete.
  pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
EOF
}

needs() {
  "$python" -c "import $1" 2>/dev/null ||
    fail "$python cannot import $1: pip install $2 (or set NANOGPT_PYTHON)"
}

[ -x "$python" ] || python=python3
needs numpy numpy
checkout
prepare_data
[ "${1:-}" = --prepare ] && exit 0
[ $# -ge 6 ] || { sed -n '5,6p' "$0" >&2; exit 2; }
needs torch torch==2.13.0

dropout=$6
case "$dropout" in *.*) ;; *) dropout=$dropout.0 ;; esac  # nanoGPT's flags keep their types.
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# Evaluation once and never again, no checkpoint: the log's per-iteration times are the steps'.
(cd "$dir" && "$python" train.py config/train_shakespeare_char.py --dataset=$dataset \
  --device=cpu --compile=False --dtype=float32 --eval_iters=1 --eval_interval=100000 \
  --log_interval=1 --n_layer="$1" --n_head="$2" --n_embd="$3" --block_size="$4" \
  --batch_size="$5" --dropout="$dropout" --max_iters="${7:-30}" --lr_decay_iters=2000 \
  --out_dir="$out" > "$out/log" 2>&1) || fail "train.py failed: $(tail -3 "$out/log")"
commit=$(git -C "$dir" rev-parse --short HEAD 2>/dev/null || echo unknown)
sed -n 's/^iter \([0-9]*\): .*time \([0-9.]*\)ms.*/\1 \2/p' "$out/log" |
  awk '$1 >= 10 {print $2}' | sort -n | awk -v commit="$commit" '
    {ms[NR] = $1}
    END {
      if (!NR) { print "nanoGPT printed no timings"; exit 1 }
      printf "nanoGPT median %.1f ms/iter over %d iterations (nanoGPT %s)\n",
        ms[int((NR + 1) / 2)], NR, commit
    }'
