#!/usr/bin/env bash
# The GPU check, one command on a machine with an NVIDIA GPU, CUDA and no package registry.
# Prints one JSON summary:
#   - generation at TinyLlama-1.1B's shape in bf16 at batch 1, 16, 64 and 256 (tokens/s);
#   - twenty DPO + LoRA steps at TinyLlama's shape (s/step);
#   - SmolLM2 greedy generation on the GPU against the CPU's f32 result (share of prompts
#     whose first words agree);
#   - peak GPU memory (nvidia-smi), and the share of the memory-bandwidth bound reached at
#     batch 1 (weight bytes per decode step x steps/s over the GPU's bandwidth).
#
#   bash scripts/gpu-check.sh [--bin PATH] [--out FILE]
#   bash scripts/gpu-check.sh --dry-run      # the same steps on the CPU with a tiny model (CI)
#
# What it needs on the GPU machine (nothing is downloaded there):
#   - the binary, built where the registry is by `bash scripts/cuda-check.sh --build` (a
#     `cargo build --release --features cuda` against CUDA 13.0 wheels, the driver's version):
#     --bin, default target/release/pipeline; a `PATH.xz` beside it is unpacked first (the
#     device tool carries at most 64 MiB per call);
#   - the NVIDIA driver (libcuda.so.1) and CUDA 13's libcublas, libcublasLt, libcurand and
#     libcudart: on the loader's path, or in python's nvidia-* packages, whose lib directories
#     are then added to LD_LIBRARY_PATH here (GPU_CHECK_PYTHON: a python to look in besides
#     python3 and /opt/torch/.venv/bin/python3);
#   - models/SmolLM2-135M-Instruct.Q4_1.gguf (98 MB: carry it as `split -b 60M` parts
#     models/SmolLM2-135M-Instruct.Q4_1.gguf.part-* over two calls; they are joined here);
#   - python3 (standard library only) for the summary.
set -euo pipefail
cd "$(dirname "$0")/.."
dry=0
bin=target/release/pipeline
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --bin) bin="$2"; shift ;;
    --out) out="$2"; shift ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "gpu-check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
gguf=models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$gguf" ] && compgen -G "$gguf.part-*" >/dev/null; then
  cat "$gguf".part-* >"$gguf.tmp" && mv "$gguf.tmp" "$gguf"
fi
if [ ! -x "$bin" ] && [ -f "$bin.xz" ]; then
  xz -dk "$bin.xz" && chmod +x "$bin"
fi
[ -x "$bin" ] || { echo "gpu-check: no binary at $bin (cargo build --release --features cuda, or --bin)" >&2; exit 1; }
[ -f "$gguf" ] || { echo "gpu-check: $gguf is missing (bash scripts/setup.sh fetches it; see the header for carrying it)" >&2; exit 1; }
command -v python3 >/dev/null || { echo "gpu-check: python3 is needed for the summary" >&2; exit 1; }

# The CUDA binary asks for libcuda.so.1 (the driver) and, by soname, libcublas(Lt).so.13,
# libcurand.so.10 and libcudart.so.13 (libnvrtc.so.13 if it uses it). Where no CUDA toolkit is
# installed they come from python's nvidia-* wheels (site-packages/nvidia/cu13/lib, or
# nvidia/*/lib for older wheels), which the loader does not search: add those directories to
# LD_LIBRARY_PATH when ldd misses a library, and stop, naming it, if one is still missing.
unresolved() { ldd "$bin" 2>/dev/null | awk '/=> not found/ { print $1 }' | sort -u; }
if ! command -v ldd >/dev/null; then
  echo "gpu-check: no ldd here; not checking that the binary's shared libraries resolve" >&2
elif [ -n "$(unresolved)" ]; then
  libdirs=()
  for p in ${GPU_CHECK_PYTHON:-} python3 /opt/torch/.venv/bin/python3; do
    command -v "$p" >/dev/null || continue
    while IFS= read -r sp; do
      for d in "$sp"/nvidia/cu13/lib "$sp"/nvidia/*/lib; do
        compgen -G "$d/lib*.so*" >/dev/null || continue
        case " ${libdirs[*]-} " in *" $d "*) ;; *) libdirs+=("$d") ;; esac
      done
    done < <("$p" -c 'import site; print("\n".join(site.getsitepackages() + [site.getusersitepackages()]))' 2>/dev/null)
  done
  if [ "${#libdirs[@]}" -gt 0 ]; then
    LD_LIBRARY_PATH="$(IFS=:; echo "${libdirs[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export LD_LIBRARY_PATH
    echo "gpu-check: libraries from python's nvidia packages: ${libdirs[*]}" >&2
  fi
  mapfile -t missing < <(unresolved)
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "gpu-check: $bin needs shared libraries that are not found: ${missing[*]}" >&2
    case " ${missing[*]}" in *" libcuda.so"*)
      echo "gpu-check: libcuda.so.1 is the NVIDIA driver's own library: is the driver installed?" >&2 ;;
    esac
    if printf '%s\n' "${missing[@]}" | grep -qv '^libcuda\.so'; then
      echo "gpu-check: the CUDA libraries come with the python packages nvidia-cublas, nvidia-curand, nvidia-cuda-runtime and nvidia-cuda-nvrtc (cu13 wheels), or a CUDA 13 toolkit: put their lib directory on LD_LIBRARY_PATH, or name a python whose site-packages has them with GPU_CHECK_PYTHON" >&2
    fi
    exit 1
  fi
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/reviewer2-gpu-check.XXXXXX")"
trap 'kill "${smi_pid:-}" 2>/dev/null || true; rm -rf "$work"' EXIT
if [ "$dry" = 1 ]; then
  device=cpu
  shape=(--tinyllama-shape --shape-hidden 128 --shape-layers 2)
  batches=1,4; prompts=8; tokens=8; steps=3; compare_titles=4
else
  device=cuda
  shape=(--tinyllama-shape)
  batches=1,16,64,256; prompts=256; tokens=64; steps=20; compare_titles=32
  command -v nvidia-smi >/dev/null || { echo "gpu-check: nvidia-smi not found: is this a GPU machine? (--dry-run runs on the CPU)" >&2; exit 1; }
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$work/mem.log" 2>/dev/null &
  smi_pid=$!
fi
# The GPU's numerical choices, explicit, so the dry run exercises the same ones on the CPU.
gpu=(--preset quick --set "generate.device=$device" --set "train.device=$device"
     --set generate.dtype=bf16 --set train.dtype=bf16
     --set generate.attention=composed --set train.attention=composed)
say() { echo "gpu-check: $*" >&2; }

say "generation at TinyLlama's shape, batch $batches"
"$bin" -q --workdir "$work/bench" "${gpu[@]}" bench generate --prompts "$prompts" \
  --batch-size "$batches" --new-tokens "$tokens" --repeat 1 "${shape[@]}" --json >"$work/generate.jsonl"
say "$steps DPO steps at TinyLlama's shape"
"$bin" -q --workdir "$work/bench" "${gpu[@]}" bench train --steps "$steps" --batch-size 4 \
  --max-length 256 --max-prompt-length 192 "${shape[@]}" --json >"$work/train.json"
say "SmolLM2 greedy generation, $device bf16 against the CPU's f32"
greedy=(--preset quick --set generate.temperature=0 --set "scrape.count=$compare_titles"
        --set "split.train=$((compare_titles - 2))" --set split.test=2)
"$bin" -q --workdir "$work/gpu" "${greedy[@]}" --set "generate.device=$device" \
  --set generate.dtype=bf16 --set generate.attention=composed run --until generate
"$bin" -q --workdir "$work/cpu" "${greedy[@]}" --set generate.device=cpu run --until generate
kill "${smi_pid:-}" 2>/dev/null || true
gpu_name=""
[ "$dry" = 1 ] || gpu_name="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"

python3 - "$work" "$dry" "$gpu_name" >"$work/summary.json" <<'PY'
import glob, json, os, sys
work, dry, gpu = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
gen = [json.loads(l) for l in open(f"{work}/generate.jsonl")]
train = json.load(open(f"{work}/train.json"))
def texts(d):
    f = glob.glob(f"{work}/{d}/cache/generate/*/generations.jsonl")[0]
    return {r["id"]: r["text"] for r in map(json.loads, open(f))}
a, b = texts("gpu"), texts("cpu")
agree = sum(a[i].split()[:3] == b[i].split()[:3] for i in a) / len(a)
mem = None
if os.path.exists(f"{work}/mem.log"):
    vals = [int(x) for x in open(f"{work}/mem.log").read().split() if x.isdigit()]
    mem = max(vals) if vals else None
# Peak memory bandwidth, GB/s, by the GPU's name (the vendors' data sheets).
BW = [("H200", 4800), ("H100 PCIe", 2000), ("H100", 3350), ("A100-SXM4-80GB", 2039),
      ("A100 80GB PCIe", 1935), ("A100", 1555), ("L40S", 864), ("L4", 300), ("A10G", 600),
      ("RTX 4090", 1008)]
bw = next((v for k, v in BW if k in gpu), None)
one = next((g for g in gen if g["batch"] == 1), None)
bytes_per_step = one["params"] * (2 if one["dtype"] in ("bf16", "f16") else 4) if one else None
share = (one["decode_tok_s"] * bytes_per_step / (bw * 1e9)) if (one and bw) else None
print(json.dumps({
    "dry_run": dry, "gpu": gpu or None,
    "generate": [{k: g[k] for k in ("batch", "end_to_end_tok_s", "decode_tok_s", "prompt_tok_s", "wall_s", "dtype", "device")} for g in gen],
    "train": {k: train[k] for k in ("step_s", "tokens_per_s", "steps", "batch", "dtype", "device")},
    "smollm2_greedy_first_words_agree": agree, "smollm2_prompts": len(a),
    "peak_gpu_memory_mib": mem,
    "bandwidth_bound_share_batch1": share, "weight_bytes_per_decode_step": bytes_per_step,
    "gpu_bandwidth_gb_s": bw,
}, indent=2))
PY
cat "$work/summary.json"
[ -z "$out" ] || cp "$work/summary.json" "$out"
