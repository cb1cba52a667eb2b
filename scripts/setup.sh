#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install oprd-mega into it.
#
#   ./scripts/setup.sh [EXTRAS]      e.g. ./scripts/setup.sh dev   (default: no extras)
#
# Environment:
#   VENV        virtual environment folder (default: .venv in the repository root)
#   PYTHON      interpreter that creates it (default: python3; needs >= 3.11)
#   TORCH_SPEC  the torch requirement installed first (default: torch==2.13.0, the CPU wheel);
#               GPU users set e.g. TORCH_SPEC="torch==2.11.0" with their own index options.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${VENV:-$root/.venv}"
python="${PYTHON:-python3}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
extras="${1:-}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment $venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

# torch first and pinned: an open-ended torch requirement would pull a multi-GB CUDA build.
echo "[setup] installing $torch_spec"
"${pip[@]}" install --quiet "$torch_spec"
target="."
if [ -n "$extras" ]; then
  target=".[$extras]"
fi
echo "[setup] installing oprd-mega${extras:+[$extras]}"
"${pip[@]}" install --quiet -e "$target"
