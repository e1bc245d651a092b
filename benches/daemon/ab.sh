#!/usr/bin/env bash
# Two builds of fnx against each other, alternated in one run (the machine's speed drifts):
#   1. embedded `fnx map` of 100,000 no-ops on 2 workers (the whole command, start-up included);
#   2. 100,000 no-op tasks through the daemon's HTTP API (`fnx bench api`, batches of 1,000,
#      results streamed; 2 workers), each build's daemon driven by its own client.
# Prints tasks/s per run, the medians, and the ratio new / old.
# Usage: benches/daemon/ab.sh OLD_FNX NEW_FNX [REPEAT]
#   e.g. git worktree add /tmp/fnx-old <commit> && (cd /tmp/fnx-old &&
#        CARGO_TARGET_DIR=$PWD/target cargo build --release -p fnx) ...
set -euo pipefail
cd "$(dirname "$0")/../.."
OLD="$1"; NEW="$2"; REPEAT="${3:-5}"
. benches/daemon/common.sh ab

start_daemon() { # NAME BINARY -> writes $WORK/NAME/data/client.json
  local name="$1" bin="$2" port; port="$(free_port)"
  mkdir -p "$WORK/$name"
  printf '[daemon]\ndata_dir = "%s"\nlisten = "127.0.0.1:%s"\n[pools.local]\nworkers_per_manager = 2\n' \
    "$WORK/$name/data" "$port" > "$WORK/$name/site.toml"
  "$bin" daemon --config "$WORK/$name/site.toml" > "$WORK/$name/daemon.log" 2>&1 &
  for _ in $(seq 200); do curl -sf "http://127.0.0.1:$port/v1/health" >/dev/null && return 0; sleep 0.05; done
  echo "daemon $name did not start; see $WORK/$name/daemon.log" >&2; exit 1
}
stop_daemon() { pkill -TERM -f " daemon --config $WORK/$1/" || true; sleep 1; rm -rf "$WORK/$1"; }

embedded() { # BINARY -> tasks/s
  local t0 t1; t0=$(date +%s.%N)
  "$1" map examples/square.py:noop --workers 2 --input "$WORK/in.jsonl" --output /dev/null --progress never 2>/dev/null
  t1=$(date +%s.%N)
  echo "100000 / ($t1 - $t0)" | bc -l
}

api() { # NAME BINARY -> tasks/s
  start_daemon "$1" "$2"
  FNX_HOME="$WORK/$1/data" "$2" bench api --tasks 100000 --batch 1000 \
    | "$PY" -c 'import json,sys; t=json.load(sys.stdin)["throughput"]; assert t["failed"] == 0, t; print(t["tasks_per_s"])'
  stop_daemon "$1"
}

seq 1 100000 | sed 's/.*/[&]/' > "$WORK/in.jsonl"
echo "== old $OLD vs new $NEW, $REPEAT runs each, alternated (load $(load))"
eo=(); en=(); ao=(); an=()
for i in $(seq "$REPEAT"); do
  # Alternate which build goes first, so neither always runs on a warmer machine.
  if [ $((i % 2)) -eq 1 ]; then order="old new"; else order="new old"; fi
  for which in $order; do
    if [ "$which" = old ]; then
      eo+=("$(embedded "$OLD")"); ao+=("$(api "old$i" "$OLD")")
    else
      en+=("$(embedded "$NEW")"); an+=("$(api "new$i" "$NEW")")
    fi
  done
  printf '  run %s: map old %.0f new %.0f; api old %.0f new %.0f tasks/s (load %s)\n' \
    "$i" "${eo[-1]}" "${en[-1]}" "${ao[-1]}" "${an[-1]}" "$(load)"
done
for pair in "map eo en" "api ao an"; do
  set -- $pair
  o=$(eval "printf '%s\n' \"\${$2[@]}\"" | median); n=$(eval "printf '%s\n' \"\${$3[@]}\"" | median)
  printf '  median %s: old %.0f, new %.0f tasks/s, new/old %s\n' "$1" "$o" "$n" "$(echo "$n / $o" | bc -l | cut -c1-5)"
done
