#!/usr/bin/env bash
# Regenerate requirements/lock-cpu.txt: exact versions of every package the CPU environment
# installs (torch, megatron-core, transformers and every transitive dependency of the project
# and its CPU extras dev, plot, math and parquet), resolved by pip-tools' pip-compile from
# setup.py's ranges, with torch held at the CPU wheel the set-up installs.
#
#   ./scripts/lock.sh
#
# Before refreshing, run the suite against the newest versions setup.py allows
# (`./scripts/test.sh --latest`), and fix or bound in setup.py what it shows; then lock,
# then `./scripts/test.sh` with the new lock. Environment: PYTHON, TORCH_SPEC as in setup.sh.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
pip_tools_spec="pip-tools==7.7.0"
lock="requirements/lock-cpu.txt"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check "$pip_tools_spec"
echo "$torch_spec" >"$work/torch.txt"
# --strip-extras: the lock is used as a pip constraints file, which must not carry extras.
"$work/venv/bin/pip-compile" --quiet --resolver=backtracking --strip-extras \
  --no-emit-index-url --no-emit-find-links --no-emit-trusted-host \
  --extra dev --extra plot --extra math --extra parquet \
  --constraint "$work/torch.txt" \
  --output-file "$work/lock.txt" setup.py
# The CPU wheel's local label (+cpu) names a build PyPI does not serve: pin the version only,
# which the installed CPU wheel satisfies.
sed -E 's/^(torch==[0-9.]+)\+[A-Za-z0-9.]+/\1/' "$work/lock.txt" \
  | sed "s#$work/torch.txt#'TORCH_SPEC=$torch_spec'#g; s#$work/lock.txt#$lock#g" >"$lock"
echo "[lock] wrote $lock ($(grep -c '^[A-Za-z0-9]' "$lock") packages)"
