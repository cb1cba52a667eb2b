#!/usr/bin/env bash
# Real-model recovery on CPU (docs/recovery.md): SmolLM2-135M-Instruct pruned to 15 of its 30
# blocks, then distilled from the full model with OPRD and, on the same budget, with OPD top-16
# at several peak rates; the teacher and the pruned student scored on the same held-out prompts,
# the log-prob gap of every student on the teacher's greedy answers, the OPD table, and the
# figure (OPRD next to OPD top-16 at its best rate) drawn with `oprd-mega plot`.
#
#   ./scripts/recovery.sh [key.sub=value ...]     overrides go to every training run
#
# Environment: VENV, NPROC as in scripts/quickstart.sh; RECOVERY_DIR (default runs/recovery);
# RECOVERY_METHODS (default "oprd opd-top16"); RECOVERY_RATES (default "1e-4 3e-4 1e-3"), the
# peak rates of OPD top-16, each with min_lr = rate/10 as in the config; RECOVERY_LAYERS
# (default 15), the pruned depth. The teacher (`oprd-mega prepare-model`), the prompts
# (tools/make_toy_task.py --chat-task first-word) and the pruned student (`oprd-mega prune`,
# Block Influence on the first 64 training prompts) are made once and kept in RECOVERY_DIR.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
config="$root/examples/smollm2_recovery_cpu.yaml"
QUICKSTART_DIR="${RECOVERY_DIR:-runs/recovery}"
rates="${RECOVERY_RATES:-1e-4 3e-4 1e-3}"
methods="${RECOVERY_METHODS:-oprd opd-top16}"
layers="${RECOVERY_LAYERS:-15}"
# shellcheck source=scripts/quickstart_lib.sh
source "$root/scripts/quickstart_lib.sh"
cli=("$py" -m oprd_mega.cli)

for rate in $rates; do lr_overrides "$rate" RECOVERY_RATES > /dev/null; done
for method in $methods; do
  case "$method" in
    oprd | opd-top16) ;;
    *) echo "error: RECOVERY_METHODS: unknown method '$method' (oprd, opd-top16)" >&2; exit 2 ;;
  esac
done
"$root/scripts/setup.sh" plot  # matplotlib for the figure at the end

echo "[recovery] models and prompts in $out"
[ -d "$out/models/teacher" ] || "${cli[@]}" prepare-model --out "$out/models/teacher"
"$py" tools/make_toy_task.py --chat-task first-word --out "$out"
[ -d "$out/models/student" ] || "${cli[@]}" prune --model "$out/models/teacher" \
  --out "$out/models/student" --num-layers "$layers" --calibration "$out/data/train.jsonl"

evaluate() {  # evaluate NAME MODEL_DIR: greedy held-out accuracy, as the runs evaluate
  [ -f "$out/$1_eval.json" ] && return
  echo "[recovery] held-out accuracy: $1"
  "${cli[@]}" evaluate --model "$2" --prompts "$out/data/heldout.jsonl" --chat-template \
    --verifier exact --k 1 --temperature 0 --max-new-tokens 6 --max-prompts 50 --json \
    > "$out/$1_eval.json"
}
evaluate teacher "$out/models/teacher"
evaluate pruned "$out/models/student"

for method in $methods; do
  if [ "$method" = oprd ]; then  # at the config's own rate
    run oprd "checkpoint.export_hf=$out/oprd/final_hf" "$@"
    continue
  fi
  for rate in $rates; do
    rate_overrides="$(lr_overrides "$rate" RECOVERY_RATES)"
    # shellcheck disable=SC2086  # two KEY=VALUE words
    run "$method-lr$rate" distillation.method=opd-topk distillation.top_k=16 $rate_overrides \
      "checkpoint.export_hf=$out/$method-lr$rate/final_hf" "$@"
  done
done

"$py" tools/sweep_table.py "$out" --teacher "$out/teacher_eval.json" --window 5 \
  | tee "$out/baselines.md"
best="$("$py" tools/sweep_table.py "$out" --best-runs)"
mapfile -t best_runs <<< "$best"
students=("pruned=$out/models/student")
for dir in "$out"/*/final_hf; do
  [ -d "$dir" ] && students+=("$(basename "$(dirname "$dir")")=$dir")
done
"$py" tools/logprob_gap.py --teacher "$out/models/teacher" --prompts "$out/data/heldout.jsonl" \
  --max-prompts 50 --max-new-tokens 6 --json "$out/logprob_gap.json" "${students[@]}"
if [ -f "$out/oprd/logs/config.yaml" ]; then
  echo "[recovery] figure: $out/recovery.png"
  "${cli[@]}" plot "$out/oprd" "${best_runs[@]}" -o "$out/recovery.png" --force
fi
