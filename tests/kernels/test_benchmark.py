"""The benchmark tool end to end on CPU: table, JSON, and memory figures that tell paths apart."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_bench_cli_reports_every_case(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            "tools/bench_kernels.py",
            "--shapes",
            "4096x256x2048",
            "--impls",
            "naive",
            "torch",
            "--modes",
            "forward+backward",
            "nograd",
            "--repeats",
            "2",
            "--warmup",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr
    assert "time/naive" in done.stdout and "4096x256x2048" in done.stdout
    results = json.loads(out.read_text())
    by_key = {(r["case"]["impl"], r["case"]["mode"]): r for r in results}
    assert set(by_key) == {
        ("naive", "forward+backward"),
        ("naive", "nograd"),
        ("torch", "forward+backward"),
        ("torch", "nograd"),
    }
    for result in results:
        assert result["error"] == ""
        assert result["median_ms"] > 0 and result["tflops"] > 0
    # The naive path materialises several [4096, 2048] float32 tensors (32 MiB each); the
    # chunked path's workspace is bounded by its 64 MiB budget and does far less.
    naive = by_key[("naive", "forward+backward")]["peak_above_inputs_and_grads_mib"]
    chunked = by_key[("torch", "forward+backward")]["peak_above_inputs_and_grads_mib"]
    assert naive > 96
    assert chunked < naive / 2


def test_bench_rejects_bad_shape() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "oprd_kernels.benchmark", "--shapes", "12x34"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "--shapes: '12x34' is not TOKENSxD_SxD_T" in done.stderr
