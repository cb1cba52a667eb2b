#!/usr/bin/env bash
# Download, here, the wheels the GPU test machine lacks into .whl/ (tools/gpu_check.sh
# installs them there with --no-index). That machine runs Python 3.12 with torch, triton,
# transformers, numpy, safetensors, pyyaml, tensorboard... but no megatron-core.
#
#   tools/fetch_gpu_wheels.sh [MEGATRON_CORE_VERSION]     (default 0.16.1, the pinned one)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
version="${1:-0.16.1}"
rm -rf "$root/.whl" && mkdir -p "$root/.whl"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$root/.whl" "megatron-core==$version"
ls -la "$root/.whl"
