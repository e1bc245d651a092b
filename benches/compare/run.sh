#!/usr/bin/env bash
# Measure fnx and its baselines (Parsl, ProcessPoolExecutor, Dask) on the same workloads in one run.
# See README.md beside this file. Usage:
#   benches/compare/run.sh [--scale small|full] [--repeat N] [--fnx PATH] [--only SYSTEM[,SYSTEM]]
#                          [--workloads noop,sleep,transfer] [--json PATH] [--cell-timeout S] [--keep-tmp]
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="$HERE/.venv"
REQS="$HERE/requirements.txt"
PYTHON="${PYTHON:-python3}"

usage() { sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; }

scale=full repeat=3 fnx="$ROOT/target/release/fnx" only=fnx,parsl,processpool,dask
json="$HERE/results.json" extra=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --scale) scale="${2:?--scale needs small or full}"; shift 2 ;;
        --repeat) repeat="${2:?--repeat needs a number}"; shift 2 ;;
        --fnx) fnx="${2:?--fnx needs a path}"; shift 2 ;;
        --only) only="${2:?--only needs SYSTEM[,SYSTEM]}"; shift 2 ;;
        --json) json="${2:?--json needs a path}"; shift 2 ;;
        --workloads | --cell-timeout) extra+=("$1" "${2:?$1 needs a value}"); shift 2 ;;
        --keep-tmp) extra+=("$1"); shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "run.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done
case "$scale" in small | full) ;; *) echo "run.sh: --scale must be small or full" >&2; exit 2 ;; esac
[[ "$repeat" =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: --repeat must be a positive integer" >&2; exit 2; }

# The venv: made once, re-installed only when requirements.txt changes.
if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' ||
        echo "run.sh: warning: the pins in requirements.txt were checked on Python 3.11; $PYTHON is $("$PYTHON" --version 2>&1)" >&2
    echo "run.sh: creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.requirements.sha256"
want="$(sha256sum "$REQS" | cut -d' ' -f1)"
if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
    echo "run.sh: installing $(grep -v '^#' "$REQS" | xargs) into $VENV" >&2
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQS" >&2
    echo "$want" >"$stamp"
fi

# A relative --fnx is taken from where run.sh was started (the default is already absolute).
exec "$VENV/bin/python" "$HERE/baselines.py" --scale "$scale" --repeat "$repeat" --fnx "$fnx" \
    --only "$only" --json "$json" ${extra[@]+"${extra[@]}"}
