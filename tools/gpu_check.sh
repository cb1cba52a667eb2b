#!/usr/bin/env bash
# Run every GPU test and kernel benchmark in one call and write the results under a folder.
#
#   tools/gpu_check.sh [OUT_DIR]          (default: $OUT, else ./gpu_results)
#
# Works on a bare GPU machine that has torch + triton but not this project installed:
# oprd_kernels is made importable through a link to kernels/. Wheels under .whl/ (pytest,
# hypothesis, ...) are installed into /tmp/site first when present. Results:
#   env.txt             card, driver, torch/triton versions, commit
#   kernel_tests.log    pytest tests/kernels on CUDA (triton impl on the GPU)
#   bench.txt/.json     projected-MSE benchmark, bf16, N in {4096, 8192, 16384, 32768},
#                       d_s=2048, d_t=4096: naive, triton, triton-recompute, three cuBLAS GEMMs
#   bench_compile.*     the same at N=32768 with torch.compile of the naive loss
#   megatron_tests.log  pytest tests/models on CUDA (specs, SDPA attention vs Megatron's own)
#   bench_step.txt      tools/bench_step.py on CUDA: one OPRD / OPD top-1 / OPD top-16 step at
#                       the scaled-down paper shape, time and dPeak side by side
# The last two need megatron-core: run tools/fetch_gpu_wheels.sh first (here, where pip can
# download) and carry .whl.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-${OUT:-$root/gpu_results}}"
mkdir -p "$out"
cd "$root"

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
shim="$(mktemp -d)"
ln -s "$root/kernels" "$shim/oprd_kernels"
export PYTHONPATH="$shim:$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "commit: ${OPRD_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

status=0
echo "== kernel tests on CUDA"
python3 -m pytest tests/kernels -q -p no:cacheprovider -o addopts="" 2>&1 | tee "$out/kernel_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== benchmark"
python3 -m oprd_kernels.benchmark \
  --shapes 4096x2048x4096 8192x2048x4096 16384x2048x4096 32768x2048x4096 \
  --dtypes bfloat16 --modes forward+backward nograd \
  --impls naive triton triton-recompute 3gemm \
  --json "$out/bench.json" 2>&1 | tee "$out/bench.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== benchmark with torch.compile"
python3 -m oprd_kernels.benchmark \
  --shapes 32768x2048x4096 --dtypes bfloat16 --modes forward+backward \
  --impls naive compile triton 3gemm \
  --json "$out/bench_compile.json" 2>&1 | tee "$out/bench_compile.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== megatron-core checks (single process, CUDA)"
if python3 -c "import megatron.core" 2>/dev/null; then
  python3 -c "import megatron.core as m; print('megatron-core', m.__version__)" | tee -a "$out/env.txt"
  python3 -m pytest tests/models -q -p no:cacheprovider -o addopts="" 2>&1 | tee "$out/megatron_tests.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  python3 tools/bench_step.py --steps 5 2>&1 | grep -v -i "warn" | tee "$out/bench_step.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
  echo "megatron-core is not importable: run tools/fetch_gpu_wheels.sh and carry .whl" \
    | tee "$out/megatron_tests.log"
  status=1
fi

echo "gpu_check: exit $status, results in $out"
exit $status
