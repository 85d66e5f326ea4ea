#!/usr/bin/env bash
# Crash-consistency harness, full mode: one uninterrupted run of the quick preset (shortened by
# --set), then 30 SIGKILLs at seeded moments spread over all six stages (five rounds from
# scratch, one kill per stage each, every kill followed by a rerun of the same command), and the
# final artifacts compared byte for byte with the uninterrupted run's. After every kill each
# cache/<stage>/<key>/ with a manifest must verify and `status` must report nothing damaged;
# after each final run no temporary file may remain.
#
# The harness is tests/it/crash.rs, the crash:: test of the `it` test binary (CI runs it with 4
# kill points on tiny settings); this script runs it in full mode against the release binary.
#
#   bash scripts/crash-test.sh            # 30 kill points, seed 7
#   KILLS=60 SEED=3 bash scripts/crash-test.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
target="${CARGO_TARGET_DIR:-$root/target}"
cargo build --release --bin pipeline
export REVIEWER2_CRASH_FULL=1
export REVIEWER2_CRASH_KILLS="${KILLS:-30}"
export REVIEWER2_CRASH_SEED="${SEED:-7}"
export REVIEWER2_CRASH_BIN="$target/release/pipeline"
# The harness itself is light; the release test build reuses the release dependencies.
log="$target/crash-test.log"
status=0
cargo test --release --test it -- crash:: --nocapture --test-threads 1 >"$log" 2>&1 || status=$?
grep -E '^crash-test:|^test |test result' "$log" || true
if [ "$status" != 0 ]; then
    grep -A8 panicked "$log" || tail -40 "$log"
    echo "crash-test: FAILED (full log: $log)"
fi
exit "$status"
