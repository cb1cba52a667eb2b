#!/usr/bin/env bash
# The OPD baselines of the CPU quickstart: OPD top-1 and OPD top-16 at several peak learning
# rates on the quickstart's budget (examples/tiny_cpu.yaml: same steps, same evaluation), one
# run after another, then a table of held-out accuracy per method and rate (docs/baselines.md).
#
#   ./scripts/opd_sweep.sh [key.sub=value ...]     overrides go to every run
#
# Environment: VENV, QUICKSTART_DIR, NPROC as in scripts/quickstart.sh (the toy task is built
# there if missing); SWEEP_RATES (default "1e-4 3e-4 1e-3"), the peak rates, each with
# min_lr = rate/10 as in tiny_cpu.yaml; SWEEP_METHODS (default "opd-top1 opd-top16"), from
# opd-top1, opd-top16 and oprd (at tiny_cpu.yaml's own rate, run once, named oprd: the
# quickstart's OPRD run). Run NAME-lrRATE lands in QUICKSTART_DIR/NAME-lrRATE; the table goes
# to QUICKSTART_DIR/baselines.md and to stdout; with oprd, `oprd-mega plot` draws it next to
# each method's best run in QUICKSTART_DIR/baselines.png (docs/quickstart.png).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
rates="${SWEEP_RATES:-1e-4 3e-4 1e-3}"
methods="${SWEEP_METHODS:-opd-top1 opd-top16}"
# shellcheck source=scripts/quickstart_lib.sh
source "$root/scripts/quickstart_lib.sh"

# Bad rates or methods stop here, before any run.
for rate in $rates; do lr_overrides "$rate" SWEEP_RATES > /dev/null; done
for method in $methods; do
  case "$method" in
    oprd | opd-top1 | opd-top16) ;;
    *) echo "error: SWEEP_METHODS: unknown method '$method' (opd-top1, opd-top16, oprd)" >&2; exit 2 ;;
  esac
done
"$root/scripts/setup.sh" plot  # matplotlib for the figure at the end
"$py" tools/make_toy_task.py --out "$out"
for method in $methods; do
  case "$method" in
    oprd) run oprd "$@"; continue ;;
    opd-top1) method_overrides=(distillation.method=opd-top1) ;;
    opd-top16) method_overrides=(distillation.method=opd-topk distillation.top_k=16) ;;
  esac
  for rate in $rates; do
    rate_overrides="$(lr_overrides "$rate" SWEEP_RATES)"
    # shellcheck disable=SC2086  # two KEY=VALUE words
    run "$method-lr$rate" "${method_overrides[@]}" $rate_overrides "$@"
  done
done
[ -f "$out/teacher_eval.json" ] || teacher_eval
"$py" tools/sweep_table.py "$out" --teacher "$out/teacher_eval.json" | tee "$out/baselines.md"
if [ -f "$out/oprd/logs/config.yaml" ]; then  # the figure: OPRD next to each method's best run
  best="$("$py" tools/sweep_table.py "$out" --best-runs)"
  mapfile -t best_runs <<< "$best"
  echo "[sweep] figure: $out/baselines.png"
  "$py" -m oprd_mega.cli plot "$out/oprd" "${best_runs[@]}" -o "$out/baselines.png" --force
fi
