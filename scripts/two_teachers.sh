#!/usr/bin/env bash
# Two teachers in one run on CPU (docs/multi-teacher.md, "Demonstration on CPU"): the
# quickstart's student, weak on two toy tasks, distilled with OPRD on the quickstart's budget
# from a teacher strong on each, every prompt routed to its task's teacher; next to it, the same
# student distilled on the same mixed prompts from one teacher only (each in turn). Draws the
# held-out accuracy per task of the three runs with `oprd-mega plot` and prints, per run, that
# accuracy at the first and the last step.
#
#   ./scripts/two_teachers.sh [key.sub=value ...]     overrides go to every training run
#
# Environment: VENV, NPROC, QUICKSTART_DIR as in scripts/quickstart.sh (the toy task is built
# there, or reused from the quickstart, with the second task added by tools/make_toy_task.py
# --second-task); TWO_TEACHERS_RUNS (default "routed single-add single-fwd") picks the runs.
# Runs, logs and the figure two_teachers.png go to $QUICKSTART_DIR/two-teachers.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
config="$root/examples/tiny_cpu_two_teachers.yaml"
start=$(date +%s)
# shellcheck source=scripts/quickstart_lib.sh
source "$root/scripts/quickstart_lib.sh"
runs="${TWO_TEACHERS_RUNS:-routed single-add single-fwd}"
for name in $runs; do
  case "$name" in
    routed | single-add | single-fwd) ;;
    *) echo "error: TWO_TEACHERS_RUNS: unknown run '$name' (routed, single-add, single-fwd)" >&2; exit 2 ;;
  esac
done
"$root/scripts/setup.sh" plot  # matplotlib for the figure at the end

echo "[two-teachers] toy task, second task and its teacher in $out"
"$py" tools/make_toy_task.py --out "$out" --second-task
dir="$out/two-teachers"
models="$out/models"

run_two() {  # run_two NAME [overrides...]: one fresh run of $config, outputs in $dir/NAME
  local name="$1"
  shift
  echo "[two-teachers] training: $name"
  launch "$dir" "$name" \
    "student.path=$models/student" "data.path=$out/data/multi_train.jsonl" \
    "evaluation.sets.add.prompts=$out/data/heldout.jsonl" \
    "evaluation.sets.fwd.prompts=$out/data/fwd_heldout.jsonl" "$@"
}

add="{name: add, path: $models/teacher, dtype: float32}"
fwd="{name: fwd, path: $models/teacher_fwd, dtype: float32}"
for name in $runs; do
  case "$name" in
    routed) run_two routed "teachers=[$add, $fwd]" "$@" ;;  # by the task column
    # One teacher for every prompt of both tasks: no routing column.
    single-add) run_two single-add "teachers=[$add]" data.teacher_field=null "$@" ;;
    single-fwd) run_two single-fwd "teachers=[$fwd]" data.teacher_field=null "$@" ;;
  esac
done

done_runs=()
for name in $runs; do
  [ -f "$dir/$name/logs/metrics.jsonl" ] && done_runs+=("$dir/$name")
done
echo "[two-teachers] figure: $dir/two_teachers.png"
"$py" -m oprd_mega.cli plot "${done_runs[@]}" -o "$dir/two_teachers.png" --force
echo "[two-teachers] wall time $(($(date +%s) - start)) s"
"$py" tools/two_teachers_summary.py --accuracy "$models/accuracy.json" "${done_runs[@]}"
