"""The trainer end to end on CPU: real torchrun launches, Megatron, the embedded server.

References are independent runs: the uninterrupted run for resume, a one-node launch for the
two-node launch. Faults are real: an unreachable URL, a killed server process, a teacher with
NaN weights, missing files and columns.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from oprd_mega.lifetime import pid_alive
from oprd_mega.train.checkpoint import find_latest, read_state
from oprd_mega.train.metrics import read_metrics
from tests.torchrun_utils import free_port
from tests.train.runs import (
    child_env,
    comparable,
    launch_command,
    make_task,
    require_success,
    task_config,
    train,
)

METHOD_METRICS = (
    "loss",
    "rep/loss",
    "rep/cosine_similarity",
    "rep/loss/layer_1",
    "rep/loss/layer_2",
    "response_length/mean",
    "grad_norm",
    "lr",
    "tokens_per_s",
    "memory/peak_mib",
    "time/rollout",
    "time/teacher",
    "time/student",
    "time/sync",
    "time/step",
)


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_task(tmp_path_factory.mktemp("task"))


def test_resume_reproduces_the_uninterrupted_run(task: Path, tmp_path: Path) -> None:
    # Pipeline parallel: model, optimizer and RNG live on two stages (TP2 runs in the
    # restart test, DP2 in the two-node test).
    layout = {"tp": 1, "pp": 2}
    whole = task_config(task, tmp_path / "whole", parallel=layout)
    exported = tmp_path / "whole" / "hf"
    require_success(
        train(whole, "metrics.sinks=[jsonl,tensorboard]", f"checkpoint.export_hf={exported}")
    )
    split = task_config(task, tmp_path / "split", parallel=layout)
    first = require_success(train(split, "--stop-at-step", "3"))
    assert "checkpoint saved" in first and "step-00000003" in first
    # Lose the step-3 checkpoint: the resume goes back to step 2 and must drop the metrics the
    # interrupted run wrote after it.
    shutil.rmtree(tmp_path / "split" / "ckpt" / "step-00000003")
    second = require_success(train(split))
    assert "resumed from" in second and "step-00000002" in second

    reference = read_metrics(tmp_path / "whole" / "logs")
    resumed = read_metrics(tmp_path / "split" / "logs")
    assert [(r["step"], r["kind"]) for r in reference] == [
        (0, "eval"), (1, "train"), (2, "train"), (2, "eval"), (3, "train"), (4, "train"),
        (4, "eval"), (5, "train"), (6, "train"), (6, "eval"),
    ]  # fmt: skip
    assert comparable(resumed) == comparable(reference)
    train_records = [r for r in reference if r["kind"] == "train"]
    for name in METHOD_METRICS:
        assert all(isinstance(r.get(name), float | int) for r in train_records), name
    assert train_records[-1]["rep/loss"] < train_records[0]["rep/loss"]
    assert list((tmp_path / "whole" / "logs" / "tensorboard").glob("events.out.tfevents.*"))

    latest = find_latest(tmp_path / "split" / "ckpt")
    assert latest is not None and latest.name == "step-00000006"
    plain = tmp_path / "plain"
    plain.mkdir()  # the permissions of any folder made here: the checkpoint's and the export's
    assert latest.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
    assert exported.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
    state = read_state(latest)
    assert state.step == 6 and state.layout == {"tp": 1, "pp": 2, "dp": 1}
    assert not list((tmp_path / "split" / "ckpt").glob(".step-*"))  # no temp dirs left

    # The exported student equals the conversion tool's export of the final checkpoint (which
    # reads the torch_dist files layer by layer instead of gathering the live model).
    converted = tmp_path / "converted"
    subprocess.run(
        [sys.executable, "-m", "oprd_mega.convert.cli", "mcore-to-hf",
         "--mcore", str(tmp_path / "whole" / "ckpt" / "step-00000006" / "model"),
         "--hf", str(converted)],
        env=child_env(), check=True, capture_output=True, timeout=180,
    )  # fmt: skip
    ours, tools = _weights(exported), _weights(converted)
    assert sorted(ours) == sorted(tools) and all(torch.equal(ours[k], tools[k]) for k in ours)
    original = _weights(task / "student")
    assert sorted(original) == sorted(ours) and any(
        not torch.equal(original[k], ours[k]) for k in ours
    )
    assert (exported / "tokenizer.json").is_file() and (exported / "config.json").is_file()


# max_staleness 2 (~85 s) is the same mechanism with a deeper pool: out of CI (-m slow).
@pytest.mark.parametrize("staleness", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_rollouts_ahead_resume_like_the_uninterrupted_run(
    task: Path, tmp_path: Path, staleness: int
) -> None:
    """max_staleness 1 (one-step-off) and 2: the rollouts in flight at a checkpoint are saved
    with it, so the resumed run trains on what the uninterrupted one did."""
    ahead = (f"rollout.max_staleness={staleness}", "schedule.steps=4")
    whole = task_config(task, tmp_path / "whole")
    require_success(train(whole, *ahead))
    split = task_config(task, tmp_path / "split")
    require_success(train(split, *ahead, "--stop-at-step", "2"))
    second = require_success(train(split, *ahead))
    assert "resumed from" in second and "step-00000002" in second
    reference = read_metrics(tmp_path / "whole" / "logs")
    assert comparable(read_metrics(tmp_path / "split" / "logs")) == comparable(reference)
    lags = [r["rollout/staleness_max"] for r in reference if r["kind"] == "train"]
    assert lags == [min(step, staleness) for step in range(4)]
    state = read_state(tmp_path / "split" / "ckpt" / "step-00000002")
    assert state.rollouts is not None and len(state.rollouts["pool"]) == 4 * staleness


def test_one_step_off_with_distributed_sync_teacher_layout_and_evaluation(
    task: Path, tmp_path: Path
) -> None:
    """max_staleness 1 with the NCCL-style (gloo here) weight-update group, the teacher on its
    own layout (TP1 x DP2 beside the student's TP2) and an evaluation after every step."""
    layout = {"tp": 2, "pp": 1, "teacher": {"tp": 1}}
    config = task_config(task, tmp_path / "run", parallel=layout)
    out = require_success(
        train(
            config,
            "rollout.max_staleness=1",
            "rollout.weight_sync.method=distributed",
            "schedule.steps=3",
            "evaluation.interval=1",
        )
    )
    assert "done: 3 steps" in out
    records = read_metrics(tmp_path / "run" / "logs")
    assert [(r["step"], r["kind"]) for r in records] == [
        (0, "eval"), (1, "train"), (1, "eval"), (2, "train"), (2, "eval"), (3, "train"),
        (3, "eval"),
    ]  # fmt: skip
    lags = [r["rollout/staleness_max"] for r in records if r["kind"] == "train"]
    assert lags == [0.0, 1.0, 1.0]


def test_sigterm_with_rollouts_in_flight_leaves_an_attached_server_idle(
    task: Path, tmp_path: Path
) -> None:
    """The next step's rollouts generate (slowly: 1 s per decoding step) on a server the run
    attached to; SIGTERM to torchrun mid-step must not leave them decoding for nobody."""
    from oprd_mega.rollout.embedded_server import EmbeddedServer, ServerConfig

    server = EmbeddedServer(
        ServerConfig(str(task / "student"), port=0, seed=0, decode_step_delay_s=1.0)
    )
    server.start()
    try:
        url = server.url
        rollout = {
            "mode": "attach",
            "attach": {"urls": [url]},
            "max_staleness": 1,
            "sampling": {"n": 2, "temperature": 1.0, "max_new_tokens": 6, "sampling_seed": 0},
            "weight_sync": {
                "disk": {"directory": str(tmp_path / "weights")},
                "probe": {"max_new_tokens": 1},
            },
        }
        config = task_config(task, tmp_path / "run", rollout=rollout)
        metrics = tmp_path / "run" / "logs" / "metrics.jsonl"
        proc = subprocess.Popen(
            launch_command(config, "evaluation.interval=0", nproc=2),
            env=child_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and proc.poll() is None:
                if metrics.is_file() and '"train"' in metrics.read_text():
                    break
                time.sleep(0.2)
            assert proc.poll() is None, proc.communicate()[1][-4000:]
            time.sleep(2.0)  # step 2 trains (or waits) while step 3's rollouts generate
            assert _sequences(server) > 0
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        # Left alone, the six 1-second decoding steps would run on for seconds.
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and _sequences(server):
            time.sleep(0.1)
        assert _sequences(server) == 0
    finally:
        server.stop()


def _sequences(server) -> int:  # type: ignore[no-untyped-def]
    load = server.engine.load()
    return load["num_running_reqs"] + load["num_waiting_reqs"]


def test_partial_rollouts_keep_the_bound_and_resume(task: Path, tmp_path: Path) -> None:
    """Partial rollouts with a response budget the servers cut: groups may continue across
    steps, every trained token is at most one step old, and a stopped run resumes."""
    partial = ("rollout.max_staleness=1", "rollout.partial=true", "schedule.steps=4")
    config = task_config(task, tmp_path / "run")
    require_success(train(config, *partial, "--stop-at-step", "2"))
    require_success(train(config, *partial))
    records = [r for r in read_metrics(tmp_path / "run" / "logs") if r["kind"] == "train"]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["rollout/staleness_max"] <= 1 for r in records)


# CI: 3 steps, one after the resume, no evaluation. With -m slow: 4 steps, evaluated every 2.
@pytest.mark.parametrize(
    "length",
    [
        pytest.param(("schedule.steps=3", "evaluation.interval=0"), id="3-steps"),
        pytest.param(("schedule.steps=4",), id="4-steps-evaluated", marks=pytest.mark.slow),
    ],
)
def test_partial_rollouts_cut_by_tokens_resume_like_the_uninterrupted_run(
    task: Path, tmp_path: Path, length: tuple[str, ...]
) -> None:
    """Partial rollouts in chunks of 2 of the 6-token budget: responses are continued under
    newer weights, and a run stopped after step 2 and resumed trains on exactly what the
    uninterrupted run did (the cut responses in the pool at the checkpoint included)."""
    chunked = (
        "rollout.max_staleness=1",
        "rollout.partial=true",
        "rollout.partial_chunk_tokens=2",
        *length,
    )
    whole = task_config(task, tmp_path / "whole")
    require_success(train(whole, *chunked))
    split = task_config(task, tmp_path / "split")
    require_success(train(split, *chunked, "--stop-at-step", "2"))
    second = require_success(train(split, *chunked))
    assert "resumed from" in second and "step-00000002" in second
    reference = read_metrics(tmp_path / "whole" / "logs")
    assert comparable(read_metrics(tmp_path / "split" / "logs")) == comparable(reference)
    records = [r for r in reference if r["kind"] == "train"]
    assert all(r["rollout/staleness_max"] <= 1 for r in records)
    # Responses really were continued, across versions too, after the resume as well.
    assert all(r["rollout/continued_samples"] > 0 for r in records)
    assert all(r["rollout/mixed_version_samples"] > 0 for r in records[2:])
    state = read_state(tmp_path / "split" / "ckpt" / "step-00000002")
    assert state.rollouts is not None
    drafts = [d for group in state.rollouts["pool"] for d in group["drafts"]]
    assert any(d["response_ids"] and d["finish_reason"] is None for d in drafts)  # cut


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


# Slow (two 2-rank launches, ~100 s): out of CI; the multi-node wiring is shared with the
# single-node runs every CI test makes. Run with -m slow.
@pytest.mark.slow
def test_two_nodes_match_one_node(task: Path, tmp_path: Path) -> None:
    overrides = ("parallel.tp=1", "schedule.steps=2", "evaluation.interval=0")
    one = task_config(task, tmp_path / "one")
    require_success(train(one, *overrides, nproc=2))
    two = task_config(task, tmp_path / "two")
    port = free_port()
    launches = [
        subprocess.Popen(
            launch_command(two, *overrides, nproc=1, nnodes=2, node_rank=rank, port=port),
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = []
    for proc in launches:
        try:
            stdout, stderr = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for other in launches:
                other.kill()
            raise
        outputs.append((proc.returncode, stdout, stderr))
    for code, stdout, stderr in outputs:
        assert code == 0, f"--- stdout ---\n{stdout}\n--- stderr ---\n{stderr[-6000:]}"
    assert "done: 2 steps" in outputs[0][1]
    reference = comparable(read_metrics(tmp_path / "one" / "logs"))
    assert len(reference) == 2
    assert comparable(read_metrics(tmp_path / "two" / "logs")) == reference
    assert read_state(find_latest(tmp_path / "two" / "ckpt")).layout["dp"] == 2


def test_unreachable_server_fails_before_any_work(task: Path, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    rollout = {"mode": "attach", "attach": {"urls": [url], "health_timeout_s": 2}}
    config = task_config(task, tmp_path / "run", rollout=rollout)
    start = time.monotonic()
    result = train(config, "parallel.tp=1", nproc=1, timeout=120)
    assert result.returncode == 1
    assert "rollout servers" in result.stderr and url in result.stderr
    assert not (tmp_path / "run" / "ckpt").exists()
    assert not (tmp_path / "run" / "logs" / "metrics.jsonl").exists()
    assert time.monotonic() - start < 90


def test_missing_inputs_are_named(task: Path, tmp_path: Path) -> None:
    config = task_config(task, tmp_path / "run")
    missing = str(tmp_path / "nowhere")
    result = train(config, f"student.path={missing}", "parallel.tp=1", nproc=1, timeout=120)
    assert result.returncode == 1
    assert "student.path" in result.stderr and missing in result.stderr
    result = train(config, "data.prompt_key=question", "parallel.tp=1", nproc=1, timeout=180)
    assert result.returncode == 1
    assert "'question'" in result.stderr and "train.jsonl" in result.stderr


def test_a_fresh_run_refuses_another_runs_checkpoints(task: Path, tmp_path: Path) -> None:
    config = task_config(task, tmp_path / "run")
    earlier = tmp_path / "run" / "ckpt" / "step-00000006"
    earlier.mkdir(parents=True)
    (earlier / "trainer.json").write_text("{}")
    result = train(config, "--resume", "never", "parallel.tp=1", nproc=1, timeout=120)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "step-00000006" in errors[0] and "--resume auto" in errors[0]
    assert sorted(p.name for p in earlier.parent.iterdir()) == ["step-00000006"]


def test_nonfinite_loss_is_skipped_then_stops(task: Path, tmp_path: Path) -> None:
    broken = tmp_path / "nan_teacher"
    shutil.copytree(task / "teacher", broken)
    weights = load_file(str(broken / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    config = task_config(task, tmp_path / "run")
    result = train(
        config,
        f"teacher.path={broken}",
        "parallel.tp=1",
        "evaluation.interval=0",
        "schedule.max_nonfinite_in_row=2",
        nproc=1,
        timeout=180,
    )
    assert result.returncode == 1, result.stderr[-4000:]
    assert result.stdout.count("the loss is not finite; the update was skipped") == 2
    assert "2 steps in a row had a non-finite loss" in result.stderr
    records = read_metrics(tmp_path / "run" / "logs", kind="train")
    assert [r["skipped"] for r in records] == [1, 1]
    assert all(r["loss"] is None for r in records)  # NaN is written as null


def _listening_pid(port: int) -> int | None:
    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
            return conn.pid
    return None


def test_sigkill_of_torchrun_during_a_save_leaves_no_process_and_resume_starts(
    task: Path, tmp_path: Path
) -> None:
    """torchrun SIGKILLed while the ranks write a checkpoint (Megatron forks writer
    processes, rank 0 holds a Python SIGTERM handler for its servers and may wait in the save's
    barrier): every process of the run ends within the ranks' SIGTERM grace, the server's port
    is free, and the next launch resumes."""
    from oprd_mega.parallel.distributed import SIGTERM_GRACE_S

    config = task_config(task, tmp_path / "run", schedule={"steps": 4, "warmup_steps": 1})
    checkpoints = tmp_path / "run" / "ckpt"
    proc = subprocess.Popen(
        launch_command(config, nproc=2),
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    run: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if any(checkpoints.glob(".step-*.tmp-*/*")):  # a save is being written
                run = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        assert run, f"no save seen (torchrun exit {proc.poll()})"
        proc.wait(timeout=30)
        deadline = time.monotonic() + SIGTERM_GRACE_S + 20
        while time.monotonic() < deadline and any(pid_alive(pid) for pid in run):
            time.sleep(0.2)
        left = [p for p in run if pid_alive(p)]
        assert left == [], [" ".join(psutil.Process(p).cmdline())[:120] for p in left]
    finally:
        for pid in run:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
    resumed = require_success(train(config))  # same base_port: it must be free again
    assert "done: " in resumed


def _kill_server_after_step(
    config: Path, step: int, *overrides: str, nproc: int = 1
) -> tuple[int, str, str]:
    """Run the trainer, SIGKILL its rollout server once ``step`` is logged, wait for the end."""
    import yaml

    data = yaml.safe_load(config.read_text())
    port = data["rollout"]["launch"]["base_port"]
    metrics = Path(data["metrics"]["dir"]) / "metrics.jsonl"
    proc = subprocess.Popen(
        launch_command(config, *overrides, nproc=nproc),
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.is_file() and any(
                json.loads(line).get("step", 0) >= step
                for line in metrics.read_text().splitlines()
                if line.strip()
            ):
                pid = _listening_pid(port)
                assert pid is not None, "no process listens on the server port"
                psutil.Process(pid).send_signal(signal.SIGKILL)
                break
            time.sleep(0.2)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, stdout, stderr


@pytest.mark.skipif(sys.platform != "linux", reason="finds the server by its listening socket")
# At max_staleness 1 (~80 s, out of CI: -m slow) the pipeline's restart path runs in a real
# launch; tests/train/test_rollout_pipeline.py checks it against a fake server in CI.
@pytest.mark.parametrize("staleness", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_dead_server_is_restarted_and_resynced(task: Path, tmp_path: Path, staleness: int) -> None:
    """At max_staleness 1 the server dies with the next step's rollouts in flight: they are
    sent again to the restarted server."""
    config = task_config(task, tmp_path / "run")
    code, stdout, stderr = _kill_server_after_step(
        config,
        2,
        "evaluation.interval=0",
        "schedule.steps=5",
        f"rollout.max_staleness={staleness}",
        nproc=2,
    )  # TP2
    assert code == 0, f"--- stdout ---\n{stdout}\n--- stderr ---\n{stderr[-6000:]}"
    assert "restarting the rollout servers" in stdout
    records = read_metrics(tmp_path / "run" / "logs", kind="train")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert all(r["rollout/staleness_max"] <= staleness for r in records)
    # The server's logs are the run's (<metrics.dir>/rollout, no log_dir set), and the killed
    # server's log is kept beside its successor's.
    logs = tmp_path / "run" / "logs" / "rollout"
    assert sorted(p.name for p in logs.iterdir()) == [
        "rollout-server-0.log",
        "rollout-server-0.log.1",
    ]
    assert all("server ready" in log.read_text() for log in logs.iterdir())


@pytest.mark.skipif(sys.platform != "linux", reason="finds the server by its listening socket")
def test_dead_server_without_restarts_stops_with_the_step(task: Path, tmp_path: Path) -> None:
    config = task_config(task, tmp_path / "run")
    code, stdout, stderr = _kill_server_after_step(
        config, 2, "parallel.tp=1", "evaluation.interval=0", "rollout.max_restarts=0"
    )
    assert code == 1, f"--- stdout ---\n{stdout}\n--- stderr ---\n{stderr[-6000:]}"
    assert "Stopping at step" in stderr and "is intact" in stderr
    latest = find_latest(tmp_path / "run" / "ckpt")
    assert latest is not None and read_state(latest).step == 2
    assert "step-00000002" in stderr


def test_colocated_servers_release_memory_around_each_step(task: Path, tmp_path: Path) -> None:
    """``colocate: true``: the servers' weights and KV cache are released for the training
    part of each step and resumed before the sync, whose probe then checks the weights."""
    config = task_config(task, tmp_path / "run")
    result = train(
        config,
        "parallel.tp=1",
        "schedule.steps=2",
        "evaluation.interval=0",
        "rollout.launch.colocate=true",
        nproc=1,
    )
    require_success(result)
    steps = [r["step"] for r in read_metrics(tmp_path / "run" / "logs", kind="train")]
    assert steps == [1, 2]
    log = (tmp_path / "run" / "logs" / "rollout" / "rollout-server-0.log").read_text()
    assert log.count("released memory: kv_cache, weights, cuda_graph") == 2
    assert log.count("resumed memory: kv_cache, weights, cuda_graph") == 2


# Slow (two launches, ~65 s): out of CI; tests/distill/test_step.py checks recompute and
# overlap against the float64 oracle in CI. Run with -m slow.
@pytest.mark.slow
def test_recompute_and_overlapped_reduction_keep_the_metrics(task: Path, tmp_path: Path) -> None:
    """Full activation recompute and overlapped gradient reduction change where memory and
    communication go, not the training: DP2 runs give the same per-step metrics."""
    overrides = ("parallel.tp=1", "schedule.steps=2", "evaluation.interval=0")
    plain = task_config(task, tmp_path / "plain")
    require_success(train(plain, *overrides, timeout=600))
    changed = task_config(task, tmp_path / "changed")
    require_success(
        train(
            changed,
            *overrides,
            "training.recompute.granularity=full",
            "training.recompute.method=uniform",
            "training.recompute.num_layers=1",
            "training.overlap_grad_reduce=true",
            timeout=600,
        )
    )
    reference = comparable(read_metrics(tmp_path / "plain" / "logs"))
    assert len(reference) == 2
    got = comparable(read_metrics(tmp_path / "changed" / "logs"))
    assert [record.keys() for record in got] == [record.keys() for record in reference]
    for mine, theirs in zip(got, reference, strict=True):
        for key, value in theirs.items():
            if isinstance(value, float):
                assert mine[key] == pytest.approx(value, rel=1e-5, abs=1e-8), key
            else:
                assert mine[key] == value, key
