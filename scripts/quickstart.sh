#!/usr/bin/env bash
# Build fnx and run an example `fnx map` of 5,000 tasks on embedded defaults (no config file).
# Installs the few system packages fnx needs when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release -j2 -p fnx
work=$(mktemp -d)
python3 -c 'import json; [print(json.dumps([i])) for i in range(5000)]' > "$work/input.jsonl"
echo "running: fnx map square:square --input $work/input.jsonl --output $work/results.jsonl"
(cd examples && ../target/release/fnx map square:square --input "$work/input.jsonl" --output "$work/results.jsonl")
echo "first results:"
head -n 3 "$work/results.jsonl"
echo "all results: $work/results.jsonl"
