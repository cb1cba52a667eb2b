"""Micro-benchmarks of the projected-MSE implementations (``tools/bench_kernels.py``).

Each implementation runs in a fresh subprocess (so peak memory is its own), on the same inputs,
in three modes: ``forward`` (graph recorded, as in training), ``forward+backward`` and
``nograd`` (forward under ``torch.no_grad()``). Reported per run: median time, effective
TFLOP/s (one GEMM of ``2 N d_s d_t`` FLOPs for a forward, three for forward+backward, whatever
an implementation really executes) and peak memory above the inputs and above inputs + the
gradients it returns. On CUDA timings use ``triton.testing.do_bench`` and memory
``torch.cuda.max_memory_allocated``; on CPU the median of repeated wall-clock runs and the
process's peak resident set (``VmHWM``, reset after warm-up). On CUDA a ``3gemm`` row times the
three cuBLAS GEMMs that a gradient-in-forward path cannot avoid, the speed-of-light reference
(in the ``forward`` and ``nograd`` modes it times the one projection GEMM). Each run also times
its first call (compilation, autotuning) and one call at a new token count after warm-up (a
retuning or recompilation stall shows there; not for ``compile``, whose first call already
shows what a recompilation costs). After the table, every implementation's time is
given relative to ``3gemm``, ``compile`` and ``naive`` measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

IMPLS = (
    "naive",
    "compile",
    "torch",
    "triton",
    "triton-recompute",
    "triton-fused",
    "triton-fused-recompute",
    "3gemm",
)
CUDA_ONLY_IMPLS = ("triton", "triton-recompute", "triton-fused", "triton-fused-recompute", "3gemm")
# The baselines every other implementation is compared with, in the order they are printed.
BASELINES = ("3gemm", "compile", "naive")
NEW_COUNT_OFFSET = 37
"""The token count of the "new count" call: ``tokens - 37``, a multiple of no block size."""
MODES = ("forward", "forward+backward", "nograd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Case:
    impl: str
    mode: str
    tokens: int
    d_s: int
    d_t: int
    dtype: str
    normalize: bool
    masked_fraction: float
    device: str
    warmup: int
    repeats: int


@dataclass
class Result:
    case: Case
    median_ms: float
    tflops: float
    peak_above_inputs_mib: float
    peak_above_inputs_and_grads_mib: float
    first_call_ms: float = float("nan")
    new_count_ms: float = float("nan")
    error: str = ""


def _parse_shape(text: str) -> tuple[int, int, int]:
    try:
        tokens, d_s, d_t = (int(part) for part in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"--shapes: {text!r} is not TOKENSxD_SxD_T, e.g. 32768x2048x4096"
        ) from exc
    return tokens, d_s, d_t


def _read_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_cpu_peak() -> None:
    # Writing 5 to clear_refs resets VmHWM (Linux >= 4.0).
    Path("/proc/self/clear_refs").write_text("5")


def _make_inputs(case: Case) -> dict[str, torch.Tensor]:
    generator = torch.Generator(device="cpu").manual_seed(0)
    dtype = DTYPES[case.dtype]
    device = torch.device(case.device)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)

    grad = case.mode != "nograd"
    inputs = {
        "student": randn(case.tokens, case.d_s).requires_grad_(grad),
        "target": randn(case.tokens, case.d_t),
        "weight": randn(case.d_t, case.d_s, scale=case.d_s**-0.5).requires_grad_(grad),
    }
    keep = torch.rand(case.tokens, generator=generator) >= case.masked_fraction
    inputs["token_weight"] = keep.to(device=device, dtype=torch.float32)
    return inputs


def _loss_fn(case: Case) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    from .api import projected_mse
    from .reference import projected_mse_reference

    def naive(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return projected_mse_reference(
            inputs["student"],
            inputs["target"],
            inputs["weight"],
            None,
            inputs["token_weight"],
            normalize=case.normalize,
            reduction="mean",
        )

    if case.impl == "naive":
        return naive
    if case.impl == "compile":
        return torch.compile(naive)
    impl, recompute = {
        "torch": ("torch", False),
        "triton": ("triton", False),
        "triton-recompute": ("triton", True),
        "triton-fused": ("triton-fused", False),
        "triton-fused-recompute": ("triton-fused", True),
    }[case.impl]

    def fused(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return projected_mse(
            inputs["student"],
            inputs["target"],
            inputs["weight"],
            token_weight=inputs["token_weight"],
            normalize=case.normalize,
            impl=impl,  # type: ignore[arg-type]
            recompute=recompute,
        )

    return fused


def _step_fn(
    case: Case, inputs: dict[str, torch.Tensor], tokens: int | None = None
) -> Callable[[], object]:
    """One timed call; ``tokens`` uses only the first rows (the new-count call)."""
    rows = slice(0, case.tokens if tokens is None else tokens)
    if case.impl == "3gemm":
        dtype = DTYPES[case.dtype]
        student, weight = inputs["student"].detach()[rows], inputs["weight"].detach()
        gradient = torch.randn(student.shape[0], case.d_t, device=case.device, dtype=dtype)

        def three_gemms() -> object:
            projection = student @ weight.t()
            if case.mode == "nograd" or case.mode == "forward":
                return projection
            return projection, gradient @ weight, gradient.t() @ student

        return three_gemms
    loss_fn = _loss_fn(case)
    leaves = (inputs["student"], inputs["weight"])
    arguments = {
        name: tensor if name == "weight" else tensor[rows] for name, tensor in inputs.items()
    }

    def step() -> object:
        for leaf in leaves:
            leaf.grad = None
        if case.mode == "nograd":
            with torch.no_grad():
                return loss_fn(arguments)
        loss = loss_fn(arguments)
        if case.mode == "forward+backward":
            loss.backward()
        return loss

    return step


def _timed_once(step: Callable[[], object], cuda: bool) -> float:
    """Wall-clock milliseconds of one call, device work included."""
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def _gradient_bytes(case: Case) -> int:
    if case.mode != "forward+backward" or case.impl == "3gemm":
        return 0
    element = torch.empty((), dtype=DTYPES[case.dtype]).element_size()
    return element * (case.tokens * case.d_s + case.d_t * case.d_s)


def run_case(case: Case) -> Result:
    """Time and measure one case in this process."""
    inputs = _make_inputs(case)
    step = _step_fn(case, inputs)
    cuda = case.device.startswith("cuda")
    first_call_ms = _timed_once(step, cuda)
    for _ in range(case.warmup - 1):
        step()
    new_count_ms = float("nan")
    # Not for compile: it would recompile for the new shape (its first call shows that cost).
    if case.tokens > NEW_COUNT_OFFSET and case.impl != "compile":
        new_count_ms = _timed_once(_step_fn(case, inputs, case.tokens - NEW_COUNT_OFFSET), cuda)
    if cuda:
        torch.cuda.synchronize()
        for name in ("student", "weight"):
            inputs[name].grad = None
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - baseline
        from triton.testing import do_bench

        median_ms = float(do_bench(step, warmup=25, rep=max(100, case.repeats * 10)))
    else:
        for name in ("student", "weight"):
            inputs[name].grad = None
        _reset_cpu_peak()
        baseline = _read_status_kib("VmRSS") * 1024
        times = []
        for _ in range(case.repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        peak = _read_status_kib("VmHWM") * 1024 - baseline
        median_ms = statistics.median(times) * 1e3
    gemms = 3 if case.mode == "forward+backward" else 1
    flops = gemms * 2.0 * case.tokens * case.d_s * case.d_t
    mib = 2.0**20
    return Result(
        case=case,
        median_ms=median_ms,
        tflops=flops / (median_ms * 1e-3) / 1e12,
        peak_above_inputs_mib=peak / mib,
        peak_above_inputs_and_grads_mib=(peak - _gradient_bytes(case)) / mib,
        first_call_ms=first_call_ms,
        new_count_ms=new_count_ms,
    )


def run_in_subprocess(case: Case, timeout: float) -> Result:
    """Run ``case`` in a fresh interpreter so its peak memory is its own."""
    command = [sys.executable, "-m", "oprd_kernels.benchmark", "--child", json.dumps(asdict(case))]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Result(case, float("nan"), float("nan"), float("nan"), float("nan"), "timeout")
    if done.returncode != 0:
        error = (done.stderr.strip().splitlines() or ["failed"])[-1]
        return Result(case, float("nan"), float("nan"), float("nan"), float("nan"), error)
    payload = json.loads(done.stdout.strip().splitlines()[-1])
    payload.pop("case")
    return Result(case=case, **payload)


def _available(impl: str, device: str) -> bool:
    if impl in CUDA_ONLY_IMPLS:
        return device.startswith("cuda")
    return True


def _group_key(case: Case) -> tuple[object, ...]:
    return (case.tokens, case.d_s, case.d_t, case.dtype, case.mode, case.normalize)


def time_ratios(results: list[Result]) -> dict[int, dict[str, float]]:
    """Per result (by position): its median time over each baseline's in the same group."""
    baselines: dict[tuple[object, ...], dict[str, float]] = {}
    for result in results:
        if result.case.impl in BASELINES and not result.error:
            baselines.setdefault(_group_key(result.case), {})[result.case.impl] = result.median_ms
    ratios: dict[int, dict[str, float]] = {}
    for index, result in enumerate(results):
        found = baselines.get(_group_key(result.case), {})
        ratios[index] = {name: result.median_ms / ms for name, ms in found.items() if ms > 0}
    return ratios


def _ratio(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.2f}x"


def format_table(results: list[Result]) -> str:
    """All results, with time relative to ``3gemm``, ``compile`` and ``naive`` of the same run.

    In the ``forward`` and ``nograd`` modes ``3gemm`` is one GEMM, so ``time/3gemm`` there is the
    ratio to one GEMM of the same shape.
    """
    header = (
        f"{'shape':>20} {'dtype':>9} {'mode':>16} {'impl':>22} {'ms':>10} {'TFLOP/s':>8} "
        f"{'peak>in MiB':>12} {'peak>in+grad':>13} {'1st call s':>10} {'new N ms':>9} "
        f"{'time/3gemm':>10} {'time/compile':>12} {'time/naive':>10} {'mem/naive':>9}"
    )
    lines = [header, "-" * len(header)]
    ratios = time_ratios(results)
    naive_peaks = {
        _group_key(r.case): r.peak_above_inputs_and_grads_mib
        for r in results
        if r.case.impl == "naive" and not r.error
    }
    for index, result in enumerate(results):
        c = result.case
        shape = f"{c.tokens}x{c.d_s}x{c.d_t}"
        if result.error:
            lines.append(
                f"{shape:>20} {c.dtype:>9} {c.mode:>16} {c.impl:>22}  error: {result.error}"
            )
            continue
        mem_ratio = "-"
        base_peak = naive_peaks.get(_group_key(c), 0.0)
        if base_peak > 0:
            mem_ratio = f"{result.peak_above_inputs_and_grads_mib / base_peak:.1%}"
        ratio = ratios[index]
        lines.append(
            f"{shape:>20} {c.dtype:>9} {c.mode:>16} {c.impl:>22} {result.median_ms:>10.3f} "
            f"{result.tflops:>8.2f} {result.peak_above_inputs_mib:>12.1f} "
            f"{result.peak_above_inputs_and_grads_mib:>13.1f} "
            f"{result.first_call_ms / 1e3:>10.2f} {result.new_count_ms:>9.2f} "
            f"{_ratio(ratio.get('3gemm')):>10} {_ratio(ratio.get('compile')):>12} "
            f"{_ratio(ratio.get('naive')):>10} {mem_ratio:>9}"
        )
    return "\n".join(lines)


def _write_json(path: Path, results: list[Result]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(r) for r in results], indent=2))


def load_results(paths: list[Path]) -> list[Result]:
    """Results written by ``--json`` (several files are concatenated)."""
    results = []
    for path in paths:
        for payload in json.loads(path.read_text()):
            case = Case(**payload.pop("case"))
            results.append(Result(case=case, **payload))
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oprd-mega bench",
        description="Benchmark the projected-MSE implementations side by side.",
    )
    parser.add_argument(
        "--shapes",
        type=_parse_shape,
        nargs="+",
        default=[(4096, 2048, 4096)],
        help="TOKENSxD_SxD_T, several allowed (default 4096x2048x4096)",
    )
    parser.add_argument(
        "--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32"], help="input dtypes"
    )
    parser.add_argument(
        "--modes", nargs="+", choices=MODES, default=list(MODES), help="what is timed (all)"
    )
    parser.add_argument(
        "--impls",
        nargs="+",
        choices=IMPLS,
        default=list(IMPLS),
        help="those needing CUDA (triton*, 3gemm) are skipped without it",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda when available, else cpu",
    )
    parser.add_argument("--plain", action="store_true", help="plain MSE instead of normalized")
    parser.add_argument(
        "--masked-fraction", type=float, default=0.0, help="share of tokens masked out (0)"
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="warm-up calls, the timed first call included (1)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (3)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per case")
    parser.add_argument("--json", type=Path, help="write all results to this JSON file")
    parser.add_argument(
        "--summary",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="print the table of results already written by --json (one run per file) and exit",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        result = run_case(Case(**json.loads(args.child)))
        print(json.dumps(asdict(result)))
        return 0
    if args.summary:
        # Ratios are taken within each file: only what one run measured side by side.
        print("\n\n".join(format_table(load_results([path])) for path in args.summary))
        return 0
    if not 0.0 <= args.masked_fraction < 1.0:
        raise SystemExit("--masked-fraction must be in [0, 1)")
    results: list[Result] = []
    for tokens, d_s, d_t in args.shapes:
        for dtype in args.dtypes:
            for mode in args.modes:
                for impl in args.impls:
                    if not _available(impl, args.device):
                        continue
                    case = Case(
                        impl=impl,
                        mode=mode,
                        tokens=tokens,
                        d_s=d_s,
                        d_t=d_t,
                        dtype=dtype,
                        normalize=not args.plain,
                        masked_fraction=args.masked_fraction,
                        device=args.device,
                        warmup=args.warmup,
                        repeats=args.repeats,
                    )
                    result = run_in_subprocess(case, args.timeout)
                    results.append(result)
                    if args.json:  # after every case: a run cut short keeps what it measured
                        _write_json(args.json, results)
                    print(
                        f"[bench] {tokens}x{d_s}x{d_t} {dtype} {mode} {impl}: "
                        + (result.error or f"{result.median_ms:.3f} ms"),
                        file=sys.stderr,
                        flush=True,
                    )
    print(format_table(results))
    if args.json:
        _write_json(args.json, results)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
