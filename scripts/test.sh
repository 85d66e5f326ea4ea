#!/usr/bin/env bash
# The test command (README, CI): set-up first (it fetches the real model), then the whole suite.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
cargo test --all-targets "$@"
