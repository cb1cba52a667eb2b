#!/usr/bin/env bash
# Download, here, the wheels the GPU test machine lacks into .whl/ (tools/gpu_check.sh
# installs them there with --no-index). That machine runs Python 3.12 with torch, triton,
# transformers, numpy, safetensors, pyyaml, tensorboard... but no megatron-core, pydantic (and
# its pydantic-core, annotated-types, typing-inspection; typing-extensions >= 4.16 for this
# pydantic) or msgspec.
#
#   tools/fetch_gpu_wheels.sh [MEGATRON_CORE_VERSION]     (default 0.16.1, the pinned one)
#
# The other versions are those CI tests with (pydantic-core is pinned exactly by pydantic).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
version="${1:-0.16.1}"
rm -rf "$root/.whl" && mkdir -p "$root/.whl"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$root/.whl" \
  "megatron-core==$version" \
  "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" \
  "typing-inspection==0.4.5" "typing-extensions==4.16.0" "msgspec==0.23.0"
ls -la "$root/.whl"
