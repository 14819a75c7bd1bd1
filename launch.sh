#!/usr/bin/env bash
# randygpt's front door. Creates .venv and installs requirements.txt on first use (and again
# whenever requirements.txt changes), then:
#   ./launch.sh test [pytest args]        run the test suite
#   ./launch.sh report RUN_DIR... [flags] compare runs (python -m randygpt.report)
#   ./launch.sh FLAGFILE.cfg [flags]      train with a flag file, e.g. experiments/shakespeare.cfg
#   ./launch.sh [flags]                   train with flags alone
#   ./launch.sh --processes=N ...         the same, as N local processes training one model
# Works with macOS's bash 3.2. Set PYTHON to choose the interpreter (3.10 or newer).
set -eu

root=$(cd "$(dirname "$0")" && pwd)
venv="$root/.venv"

find_python() {
  for candidate in ${PYTHON:-} python3.13 python3.12 python3.11 python3.10 python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 &&
        "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  echo "launch.sh: randygpt needs Python 3.10 or newer; set PYTHON=/path/to/python3" >&2
  return 1
}

if [ ! -x "$venv/bin/python" ]; then
  python=$(find_python)
  echo "launch.sh: creating $venv with $python" >&2
  "$python" -m venv "$venv"
fi
if ! cmp -s "$root/requirements.txt" "$venv/requirements.installed"; then
  echo "launch.sh: installing requirements.txt into $venv" >&2
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -r "$root/requirements.txt"
  cp "$root/requirements.txt" "$venv/requirements.installed"
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
    # pytest.ini: tests/, less -m slow. pytest-xdist runs the tests on up to 4 cores (most of
    # the suite's time is XLA compiling, which uses one core); loadgroup keeps the tests that
    # share a costly fixture (marked xdist_group) on one worker.
    exec "$venv/bin/python" -m pytest -n auto --maxprocesses=4 --dist loadgroup ${1+"$@"}
    ;;
  report)
    shift
    exec "$venv/bin/python" -m randygpt.report ${1+"$@"}
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
