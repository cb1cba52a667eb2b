# Shared by scripts/quickstart.sh and scripts/opd_sweep.sh (source it; it runs nothing itself):
# the toy task's paths, one training run of examples/tiny_cpu.yaml under torchrun, and the
# teacher's evaluation, so the quickstart and the baseline sweep train on exactly one recipe.
#
# Expects root (the repository root), and optionally config (the training config, default
# examples/tiny_cpu.yaml); sets venv and py (VENV, default .venv), out (QUICKSTART_DIR, default
# runs/quickstart) and nproc (NPROC, default 2), and one thread per process.

venv="${VENV:-$root/.venv}"
py="$venv/bin/python"
out="${QUICKSTART_DIR:-runs/quickstart}"
nproc="${NPROC:-2}"
config="${config:-$root/examples/tiny_cpu.yaml}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"

launch() {  # launch DIR NAME [overrides...]: one fresh training run of $config under
  # torchrun, its checkpoints, logs and synced weights in DIR/NAME
  local dir="$1" name="$2"
  shift 2
  rm -rf "${dir:?}/$name"
  # --log-dir: torchrun otherwise leaves a /tmp/torchelastic_* folder per launch.
  "$py" -m torch.distributed.run --nnodes 1 --nproc-per-node "$nproc" \
    --log-dir "$dir/$name/logs/torchrun" --master-addr 127.0.0.1 --master-port "$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')" \
    -m oprd_mega.train --config "$config" --resume never \
    "checkpoint.dir=$dir/$name/checkpoints" "metrics.dir=$dir/$name/logs" \
    "rollout.launch.log_dir=$dir/$name/logs/rollout" \
    "rollout.weight_sync.disk.directory=$dir/$name/rollout_weights" \
    metrics.progress_bar=false "$@"
}

run() {  # run NAME [overrides...]: one fresh run of $config on the toy task, outputs in
  # $out/NAME
  local name="$1"
  shift
  echo "[quickstart] training: $name"
  launch "$out" "$name" \
    "student.path=$out/models/student" "teacher.path=$out/models/teacher" \
    "data.path=$out/data/train.jsonl" "evaluation.prompts=$out/data/heldout.jsonl" "$@"
}

lr_overrides() {  # lr_overrides LR SOURCE: optimizer.lr=LR optimizer.min_lr=LR/10 (the shape
  # of tiny_cpu.yaml); SOURCE names where LR came from in the error on a bad LR
  "$py" - "$1" "$2" <<'PY'
import sys

try:
    lr = float(sys.argv[1])
except ValueError:
    lr = -1.0
if not lr > 0:
    sys.exit(f"error: {sys.argv[2]}: learning rate {sys.argv[1]!r} is not a positive number")
print(f"optimizer.lr={lr:g}", f"optimizer.min_lr={lr / 10:g}")
PY
}

teacher_eval() {  # teacher_eval: the teacher's held-out accuracy to $out/teacher_eval.json
  echo "[quickstart] teacher accuracy"
  "$py" -m oprd_mega.cli evaluate --model "$out/models/teacher" \
    --prompts "$out/data/heldout.jsonl" --verifier exact --k 1 --temperature 0 \
    --max-new-tokens 4 --port 31900 --json > "$out/teacher_eval.json"
}
