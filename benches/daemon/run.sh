#!/usr/bin/env bash
# The daemon's benchmarks (issue 3), each against a baseline measured in the same run:
#   1. 100,000 no-op tasks through the HTTP API (batches of 1,000, results streamed), 2 workers,
#      vs embedded `fnx map` of 100,000 no-ops with 2 workers; alternated, REPEAT times each;
#   2. round-trip latency of one task on an idle daemon: `fnx bench api --round-trips` (Rust
#      client) and the Python SDK (`Client.run` + `get_result`), with store.sync full and normal;
#   3. daemon memory with 1,000,000 queued tasks and restart time with them in the store.
# Usage: benches/daemon/run.sh [REPEAT]      (needs: cargo build --release -p fnx)
set -euo pipefail
cd "$(dirname "$0")/../.."
REPEAT="${1:-3}"
. benches/daemon/common.sh daemon

start_daemon() { # NAME SYNC -> sets URL_$NAME, writes $WORK/NAME/data/client.json
  local name="$1" sync="$2" port; port="$(free_port)"
  mkdir -p "$WORK/$name"
  printf '[daemon]\ndata_dir = "%s"\nlisten = "127.0.0.1:%s"\n[store]\nsync = "%s"\n[pools.local]\nworkers_per_manager = 2\n' \
    "$WORK/$name/data" "$port" "$sync" > "$WORK/$name/site.toml"
  "$FNX" daemon --config "$WORK/$name/site.toml" > "$WORK/$name/daemon.log" 2>&1 &
  for _ in $(seq 200); do curl -sf "http://127.0.0.1:$port/v1/health" >/dev/null && return 0; sleep 0.05; done
  echo "daemon $name did not start; see $WORK/$name/daemon.log" >&2; exit 1
}
stop_daemon() { pkill -TERM -f "fnx daemon --config $WORK/$1/" || true; sleep 1; }

seq 1 100000 | sed 's/.*/[&]/' > "$WORK/in.jsonl"
echo "== 1. throughput: HTTP API vs embedded (load $(load))"
emb=(); api=()
for i in $(seq "$REPEAT"); do
  t0=$(date +%s.%N)
  "$FNX" map examples/square.py:noop --workers 2 --input "$WORK/in.jsonl" --output /dev/null --progress never 2>/dev/null
  t1=$(date +%s.%N)
  emb+=("$(echo "100000 / ($t1 - $t0)" | bc -l)")
  start_daemon "tp$i" full
  api+=("$(FNX_HOME="$WORK/tp$i/data" "$FNX" bench api --tasks 100000 --batch 1000 \
          | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["throughput"]["tasks_per_s"])')")
  stop_daemon "tp$i"
  echo "  run $i: embedded ${emb[-1]%.*} tasks/s, daemon API ${api[-1]%.*} tasks/s (load $(load))"
done
me=$(printf '%s\n' "${emb[@]}" | median); ma=$(printf '%s\n' "${api[@]}" | median)
echo "  median: embedded ${me%.*}, daemon API ${ma%.*} tasks/s, ratio $(echo "$ma / $me" | bc -l | cut -c1-5)"

echo "== 2. latency on an idle daemon (load $(load))"
for sync in full normal; do
  start_daemon "lat-$sync" "$sync"
  r=$(FNX_HOME="$WORK/lat-$sync/data" "$FNX" bench api --tasks 0 --round-trips 2000 \
        | "$PY" -c 'import json,sys; d=json.load(sys.stdin)["latency"]; print(d["p50_ms"], d["p99_ms"])')
  s=$(FNX_HOME="$WORK/lat-$sync/data" "$PY" benches/daemon/sdk_latency.py 2000 \
        | "$PY" -c 'import json,sys; d=json.load(sys.stdin); print(d["p50_ms"], d["p99_ms"])')
  echo "  store.sync=$sync: Rust client p50/p99 $r ms; Python SDK p50/p99 $s ms"
  stop_daemon "lat-$sync"
done

echo "== 3. 1,000,000 queued tasks (load $(load))"
FNX_BIN="$FNX" "$PY" benches/daemon/million.py 1000000
