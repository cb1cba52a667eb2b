"""The benchmark tool end to end on CPU: table, JSON, and memory figures that tell paths apart."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from oprd_kernels.benchmark import Case, Result, format_table, time_ratios


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
        assert result["first_call_ms"] > 0 and result["new_count_ms"] > 0
    # The naive path materialises several [4096, 2048] float32 tensors (32 MiB each); the
    # chunked path's workspace is bounded by its 64 MiB budget and does far less.
    naive = by_key[("naive", "forward+backward")]["peak_above_inputs_and_grads_mib"]
    chunked = by_key[("torch", "forward+backward")]["peak_above_inputs_and_grads_mib"]
    assert naive > 96
    assert chunked < naive / 2
    summary = subprocess.run(
        [sys.executable, "-m", "oprd_kernels.benchmark", "--summary", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert summary.returncode == 0, summary.stderr
    rows = [line.split() for line in summary.stdout.splitlines() if "4096x256x2048" in line]
    assert [(row[2], row[3]) for row in rows] == [
        ("forward+backward", "naive"),
        ("forward+backward", "torch"),
        ("nograd", "naive"),
        ("nograd", "torch"),
    ]
    # time/naive: 1.00x for naive itself, a ratio for torch; no 3gemm or compile on CPU.
    assert [rows[0][-2], rows[2][-2]] == ["1.00x", "1.00x"]
    assert all(row[-2].endswith("x") and row[-4:-2] == ["-", "-"] for row in rows)


def _result(impl: str, mode: str, ms: float, tokens: int = 8) -> Result:
    case = Case(impl, mode, tokens, 4, 8, "bfloat16", True, 0.0, "cuda", 1, 1)
    return Result(case, ms, 1.0, 0.0, 0.0)


def test_ratios_compare_only_within_one_shape_and_mode() -> None:
    results = [
        _result("3gemm", "forward+backward", 2.0),
        _result("compile", "forward+backward", 4.0),
        _result("triton", "forward+backward", 3.0),
        _result("3gemm", "nograd", 1.0),
        _result("triton", "nograd", 1.1),
        _result("triton", "forward+backward", 5.0, tokens=16),  # no baseline at this shape
    ]
    ratios = time_ratios(results)
    assert ratios[2] == {"3gemm": 1.5, "compile": 0.75}
    assert ratios[4] == {"3gemm": 1.1}
    assert ratios[5] == {}
    table = format_table(results)
    assert "1.50x" in table and "0.75x" in table and "1.10x" in table


def test_bench_rejects_bad_shape() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "oprd_kernels.benchmark", "--shapes", "12x34"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "--shapes: '12x34' is not TOKENSxD_SxD_T" in done.stderr
