#!/usr/bin/env bash
# randygpt's front door. Creates .venv and installs requirements.txt on first use (and again
# whenever requirements.txt changes), then:
#   ./launch.sh test [pytest args]        run the test suite
#   ./launch.sh report RUN_DIR... [flags] compare runs (python -m randygpt.report)
#   ./launch.sh sample --workdir=RUN_DIR  sample from a run's checkpoint (python -m randygpt.sample)
#   ./launch.sh bench [flags]             measure speed and memory (python -m randygpt.bench)
#   ./launch.sh FLAGFILE.cfg [flags]      train with a flag file, e.g. experiments/shakespeare.cfg
#   ./launch.sh [flags]                   train with flags alone
#   ./launch.sh --processes=N ...         the same, as N local processes training one model
# Works with macOS's bash 3.2. Set PYTHON to choose the interpreter (3.10 or newer).
#
# The stack: requirements.txt in .venv; on Linux where `nvidia-smi` lists a GPU,
# requirements-cuda.txt (JAX's CUDA build) in .venv-cuda. RANDYGPT_STACK (or --stack=NAME,
# first) chooses instead: `cpu` (requirements.txt, also beside a GPU), `cuda`, or one of
# Apple Silicon's, each in its own environment, which requirements.txt never touches
# (docs/accelerators.md):
#   RANDYGPT_STACK=mps ./launch.sh ...    requirements-mps.txt in .venv-mps: jax-mps, Apple's
#                                         GPU (macOS 14 or newer, Python 3.12 or newer)
#   RANDYGPT_STACK=metal ./launch.sh ...  requirements-metal.txt in .venv-metal: jax-metal
#                                         0.1.1 on JAX 0.5.0 (legacy; Python 3.10-3.13)
set -eu

root=$(cd "$(dirname "$0")" && pwd)
stack=${RANDYGPT_STACK:-}
case "${1:-}" in
  --stack=*)
    stack=${1#--stack=}
    shift
    ;;
esac
if [ -z "$stack" ]; then
  stack=default
  if [ "$(uname -s)" = Linux ] && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    stack=cuda
    echo "launch.sh: nvidia-smi lists a GPU: using JAX's CUDA build (.venv-cuda;" \
         "RANDYGPT_STACK=cpu for the CPU build)" >&2
  fi
fi
# Each stack: its requirements file, its environment, the Python 3 minor versions it takes.
case "$stack" in
  default|cpu) stack=default requirements=requirements.txt venv="$root/.venv" oldest=10 newest=99 ;;
  cuda) requirements=requirements-cuda.txt venv="$root/.venv-cuda" oldest=11 newest=99 ;;
  mps) requirements=requirements-mps.txt venv="$root/.venv-mps" oldest=12 newest=99 ;;
  metal) requirements=requirements-metal.txt venv="$root/.venv-metal" oldest=10 newest=13 ;;
  *)
    echo "launch.sh: unknown stack '$stack' (RANDYGPT_STACK or --stack=): cpu, cuda, mps or" \
         "metal" >&2
    exit 2
    ;;
esac
if [ "$stack" = cuda ] && [ "$(uname -s)" != Linux ]; then
  echo "launch.sh: JAX's CUDA build is for Linux, and this is $(uname -s); use the default" \
       "stack (RANDYGPT_STACK=cpu)" >&2
  exit 2
fi
if { [ "$stack" = mps ] || [ "$stack" = metal ]; } &&
    [ "$(uname -s)/$(uname -m)" != Darwin/arm64 ]; then
  echo "launch.sh: the $stack stack is for macOS on Apple Silicon, and this is" \
       "$(uname -s)/$(uname -m); use the default stack (unset RANDYGPT_STACK)" >&2
  exit 2
fi

find_python() {
  for candidate in ${PYTHON:-} python3.13 python3.12 python3.11 python3.10 python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import sys;
sys.exit(not (3, $oldest) <= sys.version_info[:2] <= (3, $newest))" 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  if [ "$newest" = 99 ]; then
    echo "launch.sh: the $stack stack needs Python 3.$oldest or newer;" \
         "set PYTHON=/path/to/python3 (e.g. brew install python@3.13)" >&2
  else
    echo "launch.sh: the $stack stack needs Python 3.$oldest to 3.$newest;" \
         "set PYTHON=/path/to/python3 (e.g. brew install python@3.13)" >&2
  fi
  return 1
}

if [ ! -x "$venv/bin/python" ]; then
  python=$(find_python)
  echo "launch.sh: creating $venv with $python" >&2
  "$python" -m venv "$venv"
fi
if [ "$stack" = default ] && [ ! -f "$venv/requirements.installed" ] &&
    ls -d "$venv"/lib/python3*/site-packages/jax_metal-* >/dev/null 2>&1; then
  # The old recipe installed requirements-metal.txt into .venv by hand.
  echo "launch.sh: $venv holds jax-metal, installed by hand; the metal stack has its own" \
       "environment now: rm -rf $venv, then RANDYGPT_STACK=metal ./launch.sh ..." >&2
  exit 2
fi
# What the environment was installed from: the file, and requirements.txt that the CUDA one
# includes (a change to either reinstalls).
wanted=$(cat "$root/$requirements"; if [ "$stack" = cuda ]; then cat "$root/requirements.txt"; fi)
if [ "$wanted" != "$(cat "$venv/requirements.installed" 2>/dev/null)" ]; then
  echo "launch.sh: installing $requirements into $venv" >&2
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -r "$root/$requirements"
  printf '%s\n' "$wanted" > "$venv/requirements.installed"
fi

export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
entry="randygpt.main"
case "${1:-}" in
  --processes=*)
    entry="randygpt.launch"
    processes=$1
    shift
    ;;
esac
case "${1:-}" in
  test)
    shift
    cd "$root"
    # pytest.ini: tests/, less -m slow. pytest-xdist: one worker per core, at most 4 (the
    # suite's time is mostly XLA compiling, on one core); loadgroup keeps the tests that share
    # a costly fixture (marked xdist_group) on one worker.
    exec "$venv/bin/python" -m pytest -n auto --maxprocesses=4 --dist loadgroup ${1+"$@"}
    ;;
  report | sample | bench)
    command=$1
    shift
    exec "$venv/bin/python" -m "randygpt.$command" ${1+"$@"}
    ;;
  [!-]*.cfg)  # A flag file as the first argument (not --flagfile=x.cfg itself).
    flagfile=$1
    shift
    exec "$venv/bin/python" -m $entry ${processes:-} "--flagfile=$flagfile" ${1+"$@"}
    ;;
  *)
    exec "$venv/bin/python" -m $entry ${processes:-} ${1+"$@"}
    ;;
esac
