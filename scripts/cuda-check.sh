#!/usr/bin/env bash
# Compile-check the CUDA build (`--features cuda`) on a machine without a GPU or a CUDA install:
# nvcc, its headers and the CUDA libraries come from NVIDIA's PyPI wheels. It runs nothing on a
# GPU. Not part of CI (0.7 GB of wheels, 2 GB unpacked; from nothing, 22 minutes on 2 cores,
# most of it nvcc building candle's kernels once for check and once for release).
#
#   bash scripts/cuda-check.sh            # cargo check + clippy with --features cuda
#   bash scripts/cuda-check.sh --build    # also build and link the release binary for
#                                         # scripts/gpu-check.sh: target/release/pipeline.xz (the
#                                         # device tool carries at most 64 MiB; gpu-check.sh
#                                         # unpacks it)
#
# The toolkit is pinned to CUDA ${CUDA_CHECK_CUDA:-13.0}, the GPU machine's driver (580): candle
# loads its kernels as PTX, which a driver JIT-compiles only up to its own PTX ISA, and a newer
# nvcc writes a newer one (13.5's nvcc writes `.version 9.5`; a 13.0 driver takes 9.0). cudarc
# is told the same version (CUDARC_CUDA_VERSION), so its bindings name no newer driver entry point.
#
# --build links against the wheels' libcublas, libcublasLt, libcurand, libnvrtc and libcudart
# (unversioned links to them in $dir/cuda-VER/link/lib) and against a stub libcuda (SONAME
# libcuda.so.1, every driver entry point in the wheel's cuda.h returning
# CUDA_ERROR_STUB_LIBRARY), built here with cc; no wheel carries the driver. The binary then
# needs, at run time (NEEDED, bound at start: it is linked with BIND_NOW): libcuda.so.1 (the
# NVIDIA driver), libcublas.so.13 (and through it libcublasLt.so.13), libcurand.so.10,
# libcudart.so.13, libstdc++.so.6 and glibc 2.34 or newer; libnvrtc is linked as needed, and
# nothing uses it. gpu-check.sh finds the CUDA ones in the GPU machine's python nvidia-* packages
# (nvidia/cu13/lib) when the loader does not; no rpath is set. With the stub in place of the
# driver the binary runs on a CPU (--help, --dry-run), and opening a CUDA device fails with
# CUDA_ERROR_STUB_LIBRARY.
#
# Wheels and build output go under ${CUDA_CHECK_DIR:-/tmp/reviewer2-cuda-check}.
set -euo pipefail
cd "$(dirname "$0")/.."
build=0
[ "${1:-}" = "--build" ] && build=1
dir="${CUDA_CHECK_DIR:-/tmp/reviewer2-cuda-check}"
ver="${CUDA_CHECK_CUDA:-13.0}"
tk="$dir/cuda-$ver"
cuda="$tk/root/nvidia/cu${ver%%.*}"
link="$tk/link/lib"
mkdir -p "$tk/wheels" "$tk/root/.unpacked" "$link/stubs"
py="$(command -v python3)"

# The wheels: the compiler always; the libraries only to link (--build; cuBLAS alone is 0.4 GB).
# cuRAND has its own numbering (10.4.0 came with CUDA 13.0); any 10.x carries libcurand.so.10.
case "$ver" in 13.0) curand="10.4.0.*" ;; *) curand="10.*" ;; esac
wheels=("nvidia-cuda-nvcc==$ver.*" "nvidia-cuda-crt==$ver.*" "nvidia-nvvm==$ver.*"
        "nvidia-cuda-runtime==$ver.*" "nvidia-cuda-cccl==$ver.*")
need=(bin/nvcc include/cuda.h lib/libcudart.so.*)
if [ "$build" = 1 ]; then
  wheels+=("nvidia-cuda-nvrtc==$ver.*" "nvidia-curand==$curand" "nvidia-cublas==$ver.*")
  need+=(lib/libnvrtc.so.* lib/libcurand.so.* lib/libcublas.so.* lib/libcublasLt.so.*)
fi
missing=0
for f in "${need[@]}"; do compgen -G "$cuda/$f" >/dev/null || missing=1; done
if [ "$missing" = 1 ]; then
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$tk/wheels" "${wheels[@]}"
  for w in "$tk"/wheels/*.whl; do
    stamp="$tk/root/.unpacked/$(basename "$w")"
    [ -e "$stamp" ] && continue
    "$py" -m zipfile -e "$w" "$tk/root"
    touch "$stamp"
  done
  chmod +x "$cuda"/bin/* "$cuda"/nvvm/bin/*
  for f in "${need[@]}"; do
    compgen -G "$cuda/$f" >/dev/null || { echo "cuda-check: no $f in the wheels under $cuda" >&2; exit 1; }
  done
fi

# cudarc takes its version from CUDARC_CUDA_VERSION (it knows up to 13.4) and its link path from
# CUDA_HOME (lib and lib/stubs under it); candle's kernels build with $NVCC. All three are in the
# build scripts' fingerprints, so a change of toolkit rebuilds the kernels and the bindings.
major="${ver%%.*}" minor="${ver#*.}"
[ "$major" -eq 13 ] && [ "$minor" -gt 4 ] && minor=4
export CUDARC_CUDA_VERSION="${major}0${minor}0"
export CUDA_HOME="$tk/link"
export NVCC="$cuda/bin/nvcc"
export PATH="$cuda/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
# cudaforge (candle's kernel builder) keeps compiled kernels while their sources are unchanged,
# whatever nvcc built them: when the toolkit changes, clean them (both profiles).
stamp="$dir/target/.reviewer2-nvcc"
nvcc_id="$("$NVCC" --version | tail -1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$nvcc_id" ]; then
  cargo clean -q -p candle-kernels --target-dir "$dir/target"
  cargo clean -q -p candle-kernels --release --target-dir "$dir/target"
  mkdir -p "$dir/target"
  echo "$nvcc_id" >"$stamp"
fi
cargo check --features cuda --target-dir "$dir/target"
cargo clippy --features cuda --all-targets --target-dir "$dir/target" -- -D warnings
echo "CUDA build compile-checks (nothing was run on a GPU)."
[ "$build" = 1 ] || exit 0

# The link path: unversioned names for the wheels' libraries, and the libcuda stub.
for name in cublas cublasLt curand nvrtc cudart; do
  so="$(compgen -G "$cuda/lib/lib$name.so.[0-9]*" | head -1)"
  ln -sfn "$so" "$link/lib$name.so"
done
stub="$link/stubs/libcuda.so"
if [ ! -f "$stub" ] || [ "$cuda/include/cuda.h" -nt "$stub" ]; then
  # Every cu* function cuda.h declares, after its macros pick the versioned names
  # (cuCtxCreate -> cuCtxCreate_v4 ...), plus cudaProfiler.h's two, which the wheel lacks.
  { printf '#include <cuda.h>\n' | cc -E -P -I"$cuda/include" -x c - |
      grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d '( \t'
    printf 'cuProfilerStart\ncuProfilerStop\n'
  } | sort -u | sed 's/.*/int &(void) { return 34; } \/* CUDA_ERROR_STUB_LIBRARY *\//' >"$tk/link/libcuda-stub.c"
  cc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$stub" "$tk/link/libcuda-stub.c"
  ln -sfn libcuda.so "$link/stubs/libcuda.so.1"   # for running --help here, never shipped
fi

start=$SECONDS
cargo build --release --features cuda --target-dir "$dir/target"
echo "cuda-check: release build took $((SECONDS - start)) s"
binary="$dir/target/release/pipeline"
echo "cuda-check: $binary needs:"
readelf -d "$binary" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/  \1/p'
# The driver is asked for by its soname, to be found at run time.
readelf -d "$binary" | grep -q 'NEEDED.*\[libcuda\.so\.1\]' ||
  { echo "cuda-check: the binary does not ask for libcuda.so.1" >&2; exit 1; }
mkdir -p target/release
limit=$((64 * 1024 * 1024))   # what the device tool carries
xz -9 -T0 -c "$binary" >"$dir/pipeline.xz"
if [ "$(stat -c %s "$dir/pipeline.xz")" -gt "$limit" ]; then
  # Over the limit (it was 13 MB in December 2026): carry a copy without the symbol table
  # (panics still print their message), leaving the build's profile and fingerprints alone.
  strip -o "$dir/pipeline.stripped" "$binary"
  xz -9 -T0 -c "$dir/pipeline.stripped" >"$dir/pipeline.xz"
fi
mv "$dir/pipeline.xz" target/release/pipeline.xz
ls -l target/release/pipeline.xz
[ "$(stat -c %s target/release/pipeline.xz)" -le "$limit" ] ||
  { echo "cuda-check: target/release/pipeline.xz is over the 64 MiB the device tool carries" >&2; exit 1; }
