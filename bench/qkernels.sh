#!/usr/bin/env bash
# The generate stage on each block kernel this CPU runs, alternating, same prompts:
#   bash bench/qkernels.sh [PIPELINE_BINARY] [ROUNDS] [KERNELS]
# KERNELS is a comma list of REVIEWER2_QKERNEL names (default: avx2,avxvnni,avx512vnni; one the
# CPU lacks falls back to the best with a warning, so check the "kernel" field). Prints one JSON
# line per run, the kernel named in it. Build the binary with `--no-default-features` to take
# gemm's AVX-512 kernels out of the dense parts, as on an AVX2-class CPU.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${1:-$root/target/release/pipeline}"
rounds="${2:-2}"
kernels="${3:-avx2,avxvnni,avx512vnni}"
work="${WORKDIR:-/tmp/reviewer2-qkernels}"
model="$root/models/SmolLM2-135M-Instruct.Q4_1.gguf"
for _ in $(seq "$rounds"); do
  for k in ${kernels//,/ }; do
    out="$(REVIEWER2_QKERNEL="$k" "$bin" --workdir "$work" bench stage generate --json --quiet \
      --preset quick --set "generate.model=$model" --set generate.max_new_tokens=64 \
      --set scrape.count=150 --set generate.weights=blocks --set generate.batch_size=16 \
      --prompts 300 | grep '^{')"
    printf '{"kernel":"%s","run":%s}\n' "$k" "$out"
  done
done
