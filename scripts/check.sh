#!/usr/bin/env bash
# The one gate: formatting, lints, every Rust test (with a bounded property/fuzz run of the frame
# decoder), the Python SDK tests and the system tests on the real binary. CI runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TERM_COLOR=never
# Bounded run of the decoder property tests (protocol/tests/decode_fuzz.rs).
export PROPTEST_CASES="${PROPTEST_CASES:-4000}"

step() { printf '\n=== %s (%s)\n' "$1" "$(date +%H:%M:%S)"; }

step "dependencies"
scripts/install-deps.sh --test

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy -j2 --workspace --all-targets --locked -- -D warnings

step "cargo test"
cargo test -j2 --workspace --locked

step "build the fnx binary for the system tests"
cargo build -j2 --locked -p fnx
export FNX_BIN="$PWD/target/debug/fnx"

step "Python SDK tests"
.venv/bin/python -m pytest -q -p no:cacheprovider sdk/python/tests

step "test cluster: Slurm (4 simulated nodes), PBS wrappers, MPICH and Open MPI"
scripts/test-cluster.sh start
# Open MPI refuses root and more ranks than cores without these (CI runs as root on 2 cores).
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1

step "system tests"
.venv/bin/python -m pytest -q -p no:cacheprovider tests/system

step "all checks passed"
