# Shared by the daemon benchmark scripts (sourced after `cd` to the repository root):
# the binary, a work directory removed at exit with every daemon started on it, and helpers.
# Sets FNX, PY and WORK (WORK's name from $1).
FNX="${FNX_BIN:-$PWD/target/release/fnx}"
PY="${PYTHON:-python3}"
WORK="$(mktemp -d "/tmp/fnx-bench-$1.XXXXXX")"
trap 'pkill -f " daemon --config $WORK" 2>/dev/null || true; rm -rf "$WORK"' EXIT
load() { cut -d' ' -f1-3 /proc/loadavg; }
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
