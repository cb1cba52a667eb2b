#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install oprd-mega into it, at the
# exact versions of requirements/lock-cpu.txt (the versions CI tested).
#
#   ./scripts/setup.sh [--latest] [EXTRAS]     e.g. ./scripts/setup.sh dev   (default: no extras)
#
# --latest: ignore the lock and install the newest versions setup.py's ranges allow, into
#   .venv-latest unless VENV is set (the drift check to run before every refresh of the lock:
#   `./scripts/test.sh --latest`, then `./scripts/lock.sh`).
#
# Environment:
#   VENV        virtual environment folder (default: .venv in the repository root)
#   PYTHON      interpreter that creates it (default: python3; needs >= 3.11)
#   TORCH_SPEC  the torch requirement installed first (default: torch==2.13.0, the CPU wheel);
#               GPU users set e.g. TORCH_SPEC="torch==2.11.0" with their own index options
#               (the lock's own torch pin is then left out).
#   LOCK        the constraints file (default: requirements/lock-cpu.txt); LOCK=none is --latest
#               without the separate folder.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
default_torch="torch==2.13.0"
torch_spec="${TORCH_SPEC:-$default_torch}"
lock="${LOCK:-requirements/lock-cpu.txt}"
venv_default="$root/.venv"
if [ "${1:-}" = "--latest" ]; then
  shift
  lock=none
  venv_default="$root/.venv-latest"
fi
venv="${VENV:-$venv_default}"
python="${PYTHON:-python3}"
extras="${1:-}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment $venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

# torch first and pinned: an open-ended torch requirement would pull a multi-GB CUDA build. It
# stays a constraint below, so nothing the project asks for can move it.
echo "[setup] installing $torch_spec"
"${pip[@]}" install --quiet "$torch_spec"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "$torch_spec" >"$constraints"
if [ "$lock" = none ]; then
  echo "[setup] no lock: the newest versions setup.py allows"
  upgrade=(--upgrade --upgrade-strategy eager)
else
  if [ ! -f "$lock" ]; then
    echo "[setup] LOCK=$lock: no such file (LOCK=none installs without a lock)" >&2
    exit 2
  fi
  echo "[setup] versions from $lock"
  if [ "$torch_spec" = "$default_torch" ]; then
    cat "$lock" >>"$constraints"
  else  # another torch build: the lock's CPU pin would conflict with it
    grep -v '^torch==' "$lock" >>"$constraints"
  fi
  upgrade=()
fi
target="."
if [ -n "$extras" ]; then
  target=".[$extras]"
fi
echo "[setup] installing oprd-mega${extras:+[$extras]}"
"${pip[@]}" install --quiet "${upgrade[@]}" -c "$constraints" -e "$target"
