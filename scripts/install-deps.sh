#!/usr/bin/env bash
# Install what building and testing fnx needs, on a fresh Debian/Ubuntu machine. Idempotent:
# packages already present are not touched; nothing is downloaded when everything is there.
#   scripts/install-deps.sh          system packages to build fnx
#   scripts/install-deps.sh --test   also what the tests need: bubblewrap and the Python test
#                                    environment (.venv)
set -euo pipefail
cd "$(dirname "$0")/.."

BUILD_PACKAGES=(build-essential pkg-config libzmq3-dev libsodium-dev)
# The tests also run workers inside bubblewrap (the container tests' real sandbox), and step
# the daemon's wall clock with libfaketime (FAULTS 30: a clock step on the login node).
TEST_PACKAGES=(bubblewrap libfaketime)

packages=("${BUILD_PACKAGES[@]}")
if [ "${1:-}" = "--test" ]; then
  packages+=("${TEST_PACKAGES[@]}")
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null 2>&1 || { echo "install-deps: cargo (Rust) is required: https://rustup.rs" >&2; exit 1; }
command -v python3 >/dev/null 2>&1 || { echo "install-deps: python3 is required" >&2; exit 1; }

if [ "${1:-}" = "--test" ]; then
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  req=tests/system/requirements.txt
  stamp=.venv/.fnx-requirements
  if [ ! -f "$stamp" ] || ! cmp -s "$req" "$stamp"; then
    .venv/bin/python -m pip install -q --disable-pip-version-check -r "$req"
    cp "$req" "$stamp"
  fi
fi
