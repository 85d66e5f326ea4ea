#!/usr/bin/env bash
# Compile-check the CUDA build (`--features cuda`) on a machine without a GPU or a CUDA install:
# nvcc and its headers come from NVIDIA's PyPI wheels. It checks that the code compiles and
# that candle's kernels build; it runs nothing on a GPU. Not part of CI (about 200 MB of wheels
# and 7 minutes on 2 cores).
#
#   bash scripts/cuda-check.sh            # cargo check + clippy with --features cuda
#   bash scripts/cuda-check.sh --build    # also build the release binary for scripts/gpu-check.sh:
#                                         # target/release/pipeline.xz (the device tool carries
#                                         # at most 64 MiB; gpu-check.sh unpacks it)
#   Known gap (2026-12-01): --build compiles every kernel but fails to link here: the wheels above
#   carry no libcuda stub, libnvrtc, libcurand, libcublas(Lt) or libcudart .so to link against
#   (nvidia-cuda-nvrtc, nvidia-curand, nvidia-cublas wheels and a libcuda stub are the next step).
#
# Wheels and build output go under ${CUDA_CHECK_DIR:-/tmp/reviewer2-cuda-check}.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${CUDA_CHECK_DIR:-/tmp/reviewer2-cuda-check}"
mkdir -p "$dir/wheels" "$dir/wrap"
py="$(command -v python3)"
if [ ! -x "$dir/root/nvidia/cu13/bin/nvcc" ]; then
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$dir/wheels" nvidia-cuda-nvcc nvidia-cuda-crt nvidia-nvvm nvidia-cuda-runtime nvidia-cuda-cccl
  for w in "$dir"/wheels/*.whl; do
    "$py" -m zipfile -e "$w" "$dir/root"
  done
  chmod +x "$dir"/root/nvidia/cu13/bin/* "$dir"/root/nvidia/cu13/nvvm/bin/*
fi
cuda="$dir/root/nvidia/cu13"
# cudarc 0.19 refuses toolkits newer than it knows (13.4) when it reads `nvcc --version`; for a
# compile check, report the newest one it knows. The kernels themselves build with the real nvcc.
cat >"$dir/wrap/nvcc" <<EOF
#!/bin/sh
if [ "\$1" = "--version" ]; then "$cuda/bin/nvcc" --version | sed 's/release 13\.[5-9]/release 13.4/'; exit 0; fi
exec "$cuda/bin/nvcc" "\$@"
EOF
chmod +x "$dir/wrap/nvcc"
export PATH="$dir/wrap:$cuda/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
cargo check --features cuda --target-dir "$dir/target"
cargo clippy --features cuda --all-targets --target-dir "$dir/target" -- -D warnings
echo "CUDA build compile-checks (nothing was run on a GPU)."
if [ "${1:-}" = "--build" ]; then
  cargo build --release --features cuda --target-dir "$dir/target"
  mkdir -p target/release
  xz -9 -T0 -c "$dir/target/release/pipeline" >target/release/pipeline.xz
  ls -l target/release/pipeline.xz
fi
