#!/usr/bin/env bash
# What per-task memory limits cost (issue 12): TASKS no-op tasks through the HTTP API (`fnx
# bench api`, 2 workers) with no limit, with mem_per_worker = 1 GiB held by a memory cgroup per
# worker (where the node allows one), and with the same limit sampled (FNX_MEMORY_CGROUPS=off),
# alternated REPEAT times. Also an older build against this one with no limit, if FNX_BEFORE
# names its binary. Prints tasks/s per run, the medians and their ratios to "none".
# Usage: benches/daemon/memlimit.sh [REPEAT] [TASKS]   (needs: cargo build --release -p fnx)
set -euo pipefail
cd "$(dirname "$0")/../.."
REPEAT="${1:-3}"
TASKS="${2:-50000}"
. benches/daemon/common.sh memlimit

run() { # NAME BINARY MEM_LINE CGROUPS -> prints tasks/s
  local name="$1" bin="$2" mem="$3" cgroups="$4" port pid
  port="$(free_port)"
  mkdir -p "$WORK/$name"
  printf '[daemon]\ndata_dir = "%s"\nlisten = "127.0.0.1:%s"\npass_env = ["FNX_MEMORY_CGROUPS"]\n[pools.local]\nworkers_per_manager = 2\n%s\n' \
    "$WORK/$name/data" "$port" "$mem" > "$WORK/$name/site.toml"
  FNX_MEMORY_CGROUPS="$cgroups" "$bin" daemon --config "$WORK/$name/site.toml" > "$WORK/$name/daemon.log" 2>&1 &
  pid=$!
  for _ in $(seq 200); do curl -sf "http://127.0.0.1:$port/v1/health" >/dev/null && break; sleep 0.05; done
  FNX_HOME="$WORK/$name/data" "$FNX" bench api --tasks "$TASKS" --batch 1000 \
    | "$PY" -c 'import json,sys; t=json.load(sys.stdin)["throughput"]; assert t["failed"] == 0, t; print(t["tasks_per_s"])'
  kill -TERM "$pid"; wait "$pid" || true
  rm -rf "$WORK/$name"
}

echo "== $TASKS no-op tasks through the API: memory limits (load $(load))"
declare -A res
kinds=(none cgroup sampled)
[ -n "${FNX_BEFORE:-}" ] && kinds+=(before)
for i in $(seq "$REPEAT"); do
  line="  run $i:"
  for k in "${kinds[@]}"; do
    case "$k" in
      none) v=$(run "$k$i" "$FNX" "" auto) ;;
      cgroup) v=$(run "$k$i" "$FNX" "mem_per_worker = 1" auto) ;;
      sampled) v=$(run "$k$i" "$FNX" "mem_per_worker = 1" off) ;;
      before) v=$(run "$k$i" "$FNX_BEFORE" "" auto) ;;
    esac
    res[$k]="${res[$k]:-} $v"
    line="$line $k $(printf '%.0f' "$v")"
  done
  echo "$line tasks/s (load $(load))"
done
base=$(printf '%s\n' ${res[none]} | median)
for k in "${kinds[@]}"; do
  m=$(printf '%s\n' ${res[$k]} | median)
  echo "  median $k: ${m%.*} tasks/s, ratio to none $(echo "$m / $base" | bc -l | cut -c1-5)"
done
