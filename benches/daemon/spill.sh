#!/usr/bin/env bash
# What keeping large queued inputs in the store costs (issue 12, `limits.spill_kb`): TASKS
# tasks of KB KiB each through the HTTP API (`fnx bench api --payload-kb`, 2 workers), with the
# default spill_kb = 16 (inputs read back from the store at each dispatch) against spill_kb =
# 1048576 (every input held in memory, as before), alternated REPEAT times. Prints tasks/s,
# MB/s of inputs and the daemon's peak RSS per run, the medians and their ratio.
# Usage: benches/daemon/spill.sh [REPEAT] [TASKS] [KB]   (needs: cargo build --release -p fnx)
set -euo pipefail
cd "$(dirname "$0")/../.."
REPEAT="${1:-3}"
TASKS="${2:-5000}"
KB="${3:-100}"
. benches/daemon/common.sh spill

run() { # NAME SPILL_KB -> prints "tasks_per_s peak_rss_mib"
  local name="$1" spill="$2" port pid
  port="$(free_port)"
  mkdir -p "$WORK/$name"
  printf '[daemon]\ndata_dir = "%s"\nlisten = "127.0.0.1:%s"\n[limits]\nspill_kb = %s\n[pools.local]\nworkers_per_manager = 2\n' \
    "$WORK/$name/data" "$port" "$spill" > "$WORK/$name/site.toml"
  "$FNX" daemon --config "$WORK/$name/site.toml" > "$WORK/$name/daemon.log" 2>&1 &
  pid=$!
  for _ in $(seq 200); do curl -sf "http://127.0.0.1:$port/v1/health" >/dev/null && break; sleep 0.05; done
  local tps
  tps=$(FNX_HOME="$WORK/$name/data" "$FNX" bench api --tasks "$TASKS" --batch 100 --payload-kb "$KB" \
        | "$PY" -c 'import json,sys; t=json.load(sys.stdin)["throughput"]; assert t["failed"] == 0, t; print(t["tasks_per_s"])')
  local peak
  peak=$(awk '/VmHWM/ {print int($2/1024)}' "/proc/$pid/status")
  kill -TERM "$pid"; wait "$pid" || true
  rm -rf "$WORK/$name"
  echo "$tps $peak"
}

echo "== $TASKS tasks of $KB KiB through the API, spill on (16 KiB) vs off (load $(load))"
on=(); off=()
for i in $(seq "$REPEAT"); do
  read -r a pa <<<"$(run "on$i" 16)"
  read -r b pb <<<"$(run "off$i" 1048576)"
  on+=("$a"); off+=("$b")
  printf '  run %s: spill on %.0f tasks/s (%.0f MB/s, peak %s MiB), off %.0f tasks/s (%.0f MB/s, peak %s MiB) (load %s)\n' \
    "$i" "$a" "$(echo "$a * $KB * 1024 / 1000000" | bc -l)" "$pa" \
    "$b" "$(echo "$b * $KB * 1024 / 1000000" | bc -l)" "$pb" "$(load)"
done
mon=$(printf '%s\n' "${on[@]}" | median); moff=$(printf '%s\n' "${off[@]}" | median)
echo "  median: spill on ${mon%.*}, off ${moff%.*} tasks/s, ratio on/off $(echo "$mon / $moff" | bc -l | cut -c1-5)"
