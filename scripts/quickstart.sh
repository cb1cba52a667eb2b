#!/usr/bin/env bash
# The CPU quickstart: set up, build the toy task, distil with OPRD and with OPD top-1 on the
# same budget, print the student's held-out accuracy before and after next to the teacher's.
#
#   ./scripts/quickstart.sh [key.sub=value ...]     overrides go to both training runs
#
# Environment: VENV, PYTHON, TORCH_SPEC as in scripts/setup.sh; QUICKSTART_DIR (default
# runs/quickstart) holds the models, data, checkpoints, logs and the figure quickstart.png
# (held-out accuracy, loss, per-layer alignment of both runs); NPROC (default 2) processes;
# OPD_LR (default 1e-4, the best rate in docs/baselines.md): the OPD top-1 run's peak, min_lr = OPD_LR/10.
# Each run starts fresh (checkpoint.resume=never). The last line has the form
#   quickstart: teacher T%, student before B% -> after A% (gap closed G%); opd-top1 (lr R) after O%
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
opd_lr="${OPD_LR:-1e-4}"
start=$(date +%s)
# shellcheck source=scripts/quickstart_lib.sh
source "$root/scripts/quickstart_lib.sh"

"$root/scripts/setup.sh" plot  # matplotlib for the figure at the end

echo "[quickstart] toy task (models and data) in $out"
"$py" tools/make_toy_task.py --out "$out"

opd_overrides="$(lr_overrides "$opd_lr" OPD_LR)"  # a bad OPD_LR stops here, before any run
run oprd "$@"
# shellcheck disable=SC2086  # two KEY=VALUE words
run opd-top1 distillation.method=opd-top1 $opd_overrides "$@"

teacher_eval

echo "[quickstart] figure: $out/quickstart.png"
"$py" -m oprd_mega.cli plot "$out/oprd" "$out/opd-top1" -o "$out/quickstart.png" --force
echo "[quickstart] wall time $(($(date +%s) - start)) s"
"$py" tools/quickstart_summary.py --oprd "$out/oprd/logs" --opd "$out/opd-top1/logs" \
  --teacher "$out/teacher_eval.json"
