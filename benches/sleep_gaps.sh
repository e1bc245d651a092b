#!/usr/bin/env bash
# Measure the time between two consecutive tasks inside each worker (benches/README.md, "Where
# the time goes"): N tasks of time.sleep(SECONDS) on 2 workers, each returning its start and end.
#   benches/sleep_gaps.sh [N] [SECONDS] [FNX]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-600}; secs=${2:-0.01}; fnx=${3:-$PWD/target/release/fnx}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
python3 -c "import json; [print(json.dumps([$secs])) for _ in range($n)]" > "$work/in.jsonl"
(cd examples && "$fnx" map square:timed_nap --workers 2 --progress never -i "$work/in.jsonl" -o "$work/out.jsonl")
python3 - "$work/out.jsonl" <<'PY'
import collections, json, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    pid, start, end = json.loads(line)["result"]
    runs[pid].append((start, end))
gaps, sleeps = [], []
for spans in runs.values():
    spans.sort()
    gaps += [(b[0] - a[1]) * 1e6 for a, b in zip(spans, spans[1:])]
    sleeps += [(e - s) * 1e3 for s, e in spans]
gaps.sort(); sleeps.sort()
q = lambda xs, f: xs[min(len(xs) - 1, int(len(xs) * f))]
print(f"gap between tasks (us): p50 {q(gaps, .5):.0f}  p90 {q(gaps, .9):.0f}  p99 {q(gaps, .99):.0f}  mean {sum(gaps) / len(gaps):.0f}")
print(f"time.sleep itself (ms): p50 {q(sleeps, .5):.3f}  mean {sum(sleeps) / len(sleeps):.3f}")
PY
