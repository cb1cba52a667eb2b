#!/usr/bin/env bash
# Run the GPU benchmarks and tests in one call (<= 9.5 minutes: every stage has its own time
# limit) and write everything under a folder, ending with one summary table.
#
#   tools/gpu_check.sh [OUT_DIR]          (default: $OUT, else ./gpu_results)
#
# Works on a bare GPU machine that has torch + triton but not this project installed:
# oprd_kernels is importable from kernels/ on PYTHONPATH. The wheels under .whl/
# (tools/fetch_gpu_wheels.sh: megatron-core, pydantic and its dependencies, msgspec) are
# installed into /tmp/site first. Stages (limit in seconds), each with its log:
#   bench (170)         kernel benchmark, bf16, d_s=2048, d_t=4096, N in {32768, 8192},
#                       forward+backward: compile (torch.compile of the naive loss), triton,
#                       triton-recompute, triton-fused, 3gemm (three cuBLAS GEMMs), side by
#                       side -> bench.log/.json; fresh Triton cache, so "1st call" is cold
#   bench_nograd (45)   no-grad forward at N=32768: triton, triton-fused vs one GEMM
#   kernel_tests (120)  pytest tests/kernels on CUDA
#   megatron_tests (50) pytest tests/models on CUDA (needs megatron-core and pydantic)
#   bench_step (95)     tools/bench_step.py --preset qwen3-8b-1.7b (the 8B teacher truncated at
#                       its deepest tap), 8 x 4,096 tokens in microbatches of 2, bf16: OPRD vs
#                       OPD top-16 step time, dPeak, tokens/s, teacher time, student MFU
#   bench_overlap (80)  the same pair at 8 x 2,048 tokens in microbatches of 2: OPRD with and
#                       without distillation.overlap_teacher (teacher on a side stream)
# The benchmark writes its JSON after every case, so a stage cut short keeps what it measured.
# env.txt holds card, driver, versions and commit; summary.txt the final table.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-${OUT:-$root/gpu_results}}"
mkdir -p "$out"
cd "$root"

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  timeout 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl >"$out/wheels.log" 2>&1 \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$root/kernels:$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "commit: ${OPRD_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  timeout 60 python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  timeout 60 python3 -c "import pydantic, megatron.core as m; print('pydantic', pydantic.VERSION, 'megatron-core', m.__version__)"
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

printf 'stage\trc\tseconds\n' >"$out/stages.tsv"
# stage NAME LIMIT COMMAND...: run with a time limit, log to $out/NAME.log, record rc and time.
stage() {
  local name="$1" limit="$2"
  shift 2
  echo "== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout -k 5 "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local rc="${PIPESTATUS[0]}"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >>"$out/stages.tsv"
}

bench_shape=2048x4096
cold_cache="$(mktemp -d)"
TRITON_CACHE_DIR="$cold_cache" stage bench 170 python3 -m oprd_kernels.benchmark \
  --shapes "32768x$bench_shape" "8192x$bench_shape" --dtypes bfloat16 --modes forward+backward \
  --impls 3gemm triton compile triton-fused triton-recompute --timeout 120 --json "$out/bench.json"
stage bench_nograd 45 python3 -m oprd_kernels.benchmark \
  --shapes "32768x$bench_shape" --dtypes bfloat16 --modes nograd \
  --impls 3gemm triton triton-fused --timeout 40 --json "$out/bench_nograd.json"
stage kernel_tests 120 python3 -m pytest tests/kernels -q -p no:cacheprovider -o addopts=""
stage megatron_tests 50 python3 -m pytest tests/models -q -p no:cacheprovider -o addopts=""
stage bench_step 95 python3 tools/bench_step.py --preset qwen3-8b-1.7b --sequences 8 \
  --micro-batch-size 2 --seq-len 4096 --prompt-len 1024 --last-k 2000 --steps 2 \
  --methods oprd,opd-top16 --json "$out/bench_step.json"
stage bench_overlap 80 python3 tools/bench_step.py --preset qwen3-8b-1.7b --sequences 8 \
  --micro-batch-size 2 --seq-len 2048 --prompt-len 1024 --last-k 1000 --steps 2 \
  --methods oprd,oprd-overlap --json "$out/bench_overlap.json"

timeout 30 python3 - "$out" <<'EOF' | tee "$out/summary.txt"
"""One table: stage status, kernel times and ratios of the same run, test counts, step ratio."""
import re
import sys
from pathlib import Path

from oprd_kernels.benchmark import load_results, time_ratios

out = Path(sys.argv[1])
rows = [("what", "stage / case", "time", "result")]
for line in (out / "stages.tsv").read_text().splitlines()[1:]:
    name, rc, seconds = line.split("\t")
    log = out / f"{name}.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    result = "timed out" if rc in ("124", "137") else ""
    if name.endswith("tests"):
        counts = re.findall(r"^=* ?(\d+ (?:passed|failed|errors?|skipped)[^=\n]*?) ?=*$", text, re.M)
        result = result or (counts[-1] if counts else "no pytest summary")
    if name in ("bench_step", "bench_overlap"):
        wanted = "oprd/opd-top16" if name == "bench_step" else "oprd-overlap/oprd"
        ratio = re.findall(rf"ratio {wanted} .*", text)
        result = result or (ratio[-1] if ratio else "no ratio line")
    rows.append((name, f"rc={rc}", f"{seconds} s", result))
for step_json in (out / "bench_step.json", out / "bench_overlap.json"):
    if not step_json.exists():
        continue
    import json

    for method, r in json.loads(step_json.read_text())["results"].items():
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        rows.append((
            "step", f"{method} {r['dtype']}", f"{r['time']:.3f} s",
            f"MFU {mfu}; {r['tokens_per_s']:.0f} tokens/s; teacher {r['teacher_time']:.3f} s; "
            f"dPeak {r['dpeak'] / 2**30:.2f} GiB",
        ))  # fmt: skip
for json_name in ("bench.json", "bench_nograd.json"):
    path = out / json_name
    if not path.exists():
        continue
    results = load_results([path])
    ratios = time_ratios(results)
    for index, r in enumerate(results):
        c = r.case
        label = f"{c.mode} N={c.tokens} {c.impl}"
        if r.error:
            rows.append(("kernel", label, "", f"error: {r.error}"))
            continue
        versus = ", ".join(
            f"{value:.2f}x {'1gemm' if name == '3gemm' and c.mode != 'forward+backward' else name}"
            for name, value in ratios[index].items()
            if name != c.impl
        )
        details = [versus] if versus else []
        details += [
            f"peak>in+grad {r.peak_above_inputs_and_grads_mib:.1f} MiB",
            f"1st call {r.first_call_ms / 1e3:.2f} s",
            f"new N {r.new_count_ms:.2f} ms",
        ]
        rows.append(("kernel", label, f"{r.median_ms:.3f} ms", "; ".join(details)))
widths = [max(len(row[i]) for row in rows) for i in range(3)]
print("== summary")
for row in rows:
    print("  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3])
EOF

status=0
while IFS=$'\t' read -r name rc _; do
  [ "$name" = stage ] || [ "$rc" = 0 ] || status=1
done <"$out/stages.tsv"
echo "gpu_check: exit $status, results in $out"
exit $status
