#!/usr/bin/env bash
# Installs the open_clip parity-test stack into .venv (CPU only); tests/run.sh calls it.
# torch must be exactly 2.13.0 (a local CPU wheel here); open_clip's own deps would pull
# a CUDA torch, so everything else goes in with --no-deps at versions tested together.
# torchvision: PyPI's wheels are CUDA builds; from 0.17 on their import registers ops of
# the CUDA extension and fails on a CPU torch ("operator torchvision::nms does not exist").
# 0.16.2 skips them when the extension is missing; open_clip only uses its transforms.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-$PWD/.venv}"
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q --no-deps torchvision==0.16.2 open_clip_torch==3.3.0 \
  transformers==4.49.0 timm==1.0.31 huggingface_hub==0.36.2 tokenizers==0.21.4 ftfy==6.3.1 \
  regex==2026.11.15 wcwidth==0.9.4 hf-xet==1.8.0 \
  einops==0.8.2 einops-exts==0.0.4 open-flamingo==2.0.1
