#!/usr/bin/env python
"""One full distillation step (teacher pass, student forward/backward, optimizer) per method.

Runs ``oprd``, ``opd-top1`` and ``opd-top16`` on the same microbatches, each in its own
process (a clean allocator), and prints the median step time and the peak memory above the
pre-step baseline (the paper's dPeak) side by side, with ratios to OPD top-16. The last line is
``ratio oprd/opd-top16 time=X dpeak=Y``. ``--methods oprd,oprd-overlap`` measures what
``distillation.overlap_teacher`` saves (``ratio oprd-overlap/oprd``; with several microbatches,
the teacher on the student's layout and no pipeline; on a GPU the teacher runs on a side CUDA
stream, on a CPU in order, so there it can save nothing). ``oprd-2teachers`` adds a second
teacher of the same shape on every microbatch, ``oprd-2teachers-routed`` routes the microbatches
alternately to one teacher each (``routing``; needs at least two microbatches per replica):
``ratio oprd-2teachers/oprd`` and ``ratio oprd-2teachers-routed/oprd`` give what a second
teacher costs, and what routing saves of it. Both report each teacher's supervised tokens,
microbatches and pass time.

Memory: on CUDA ``torch.cuda.max_memory_allocated`` above the allocation before the step; on
CPU the peak resident set size (sampled every millisecond) above the resident size before the
step, after returning freed heap memory to the system (``malloc_trim``): a host-memory figure,
not a GPU's. Every rank measures its own and the report lists dPeak per rank.
``--recompute`` sets the student's activation recompute (``full``: every layer checkpointed,
Megatron's ``uniform`` method with one layer per chunk; ``selective``: core attention).

Default shape (scaled down, the paper's proportions): 4 layers, hidden 512, vocabulary 151,936,
2 sequences of 2,048 tokens (1,024 prompt + 1,024 response), last_k = 512, all layers tapped.
``--preset`` takes one of the paper's teacher -> student pairs at its real shapes instead
(:mod:`oprd_mega.models.presets`, random weights; ``--scale`` shrinks it, ``--vocab`` replaces
the vocabulary); widths that differ go through a learned ``full`` projection. Per method it also
reports tokens/s, the teacher pass time and the student's model FLOPs utilisation (the
scheduler's FLOP model over the card's dense peak, :mod:`oprd_mega.train.throughput`; on a CPU
only with ``--peak-tflops``).

Layouts: ``--nproc N`` runs each method's step on N local ranks (one ``torch.distributed.run``
launch per method) with the student at ``--tp`` / ``--pp`` / ``--cp`` (``--sp``: sequence
parallelism) and the teacher at ``--teacher-tp`` / ``--teacher-pp`` (default: the student's;
otherwise its own Megatron groups over the same ranks, as ``parallel.teacher``). ``--sequences``
counts the whole step: each data-parallel replica takes its share. Time and tokens/s are rank
0's; dPeak is listed per rank and the table shows the largest. Example (CPU, 2 ranks, student
TP2, teacher TP1 x DP2)::

    python tools/bench_step.py --nproc 2 --tp 2 --teacher-tp 1 --methods oprd \
        --layers 2 --hidden 128 --vocab 1024 --seq-len 256 --prompt-len 128 --last-k 64
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from typing import NamedTuple

from oprd_mega.models.presets import PRESETS, preset, scaled


class Method(NamedTuple):
    """A benchmarked configuration: the distillation method, its top_k,
    distillation.overlap_teacher and the teachers (``one``; ``all``: two, both on every
    microbatch; ``routed``: two, the microbatches alternately routed to one of them)."""

    kind: str
    top_k: int
    overlap_teacher: bool = False
    teachers: str = "one"


METHODS = {
    "oprd": Method("oprd", 16),
    "oprd-overlap": Method("oprd", 16, overlap_teacher=True),
    "opd-top1": Method("opd-top1", 16),
    "opd-top16": Method("opd-topk", 16),
    "oprd-2teachers": Method("oprd", 16, teachers="all"),
    "oprd-2teachers-routed": Method("oprd", 16, teachers="routed"),
}
TEACHER_NAMES = ("teacher_a", "teacher_b")
RECOMPUTE = {
    "none": {},
    "selective": {"granularity": "selective"},
    "full": {"granularity": "full", "method": "uniform", "num_layers": 1},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), help="a paper pair at its real shapes (random weights)"
    )
    parser.add_argument(
        "--scale", type=float, default=1.0, help="shrink the preset's width and depth (0, 1]"
    )
    parser.add_argument("--layers", type=int, default=4, help="layers (default shape only)")
    parser.add_argument("--hidden", type=int, default=512, help="width (default shape only)")
    parser.add_argument("--heads", type=int, default=8, help="heads (default shape only)")
    parser.add_argument(
        "--vocab", type=int, help="vocabulary (default: the preset's; 151,936 otherwise)"
    )
    parser.add_argument("--sequences", type=int, default=2, help="sequences per step")
    parser.add_argument(
        "--micro-batch-size", type=int, help="sequences per microbatch (default: all of them)"
    )
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--prompt-len", type=int, default=1024, help="prompt tokens per sequence")
    parser.add_argument("--last-k", type=int, default=512, help="supervised response positions")
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="parameter dtype (auto: bfloat16 on CUDA, float32 on a CPU)",
    )
    parser.add_argument(
        "--peak-tflops", type=float, help="the device's dense peak (default: the card's table)"
    )
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
    parser.add_argument(
        "--methods",
        default="oprd,opd-top1,opd-top16",
        help=f"comma-separated, from {', '.join(METHODS)} (oprd-overlap: OPRD with "
        "distillation.overlap_teacher, the teacher's forward of microbatch i+1 issued after the "
        "student's forward of i)",
    )
    parser.add_argument(
        "--recompute",
        choices=sorted(RECOMPUTE),
        default="none",
        help="student activation recompute (training.recompute; full: every layer)",
    )
    parser.add_argument(
        "--nproc", type=int, default=1, help="local ranks per method (a torchrun launch when > 1)"
    )
    parser.add_argument("--tp", type=int, default=1, help="student tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="student pipeline-parallel size")
    parser.add_argument("--cp", type=int, default=1, help="context-parallel size (both models)")
    parser.add_argument("--sp", action="store_true", help="student sequence parallelism")
    parser.add_argument(
        "--teacher-tp", type=int, help="teacher tensor-parallel size (default: the student's)"
    )
    parser.add_argument(
        "--teacher-pp", type=int, help="teacher pipeline-parallel size (default: the student's)"
    )
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 0 < args.scale <= 1:
        parser.error(f"--scale must be in (0, 1], got {args.scale}")
    if args.scale != 1 and args.preset is None:
        parser.error("--scale needs --preset")
    if not 0 < args.prompt_len < args.seq_len:
        parser.error(f"--prompt-len must be in 1..{args.seq_len - 1}, got {args.prompt_len}")
    layout_problem = _layout_problem(args)
    if layout_problem:
        parser.error(layout_problem)
    if args.micro_batch_size is not None and not 0 < args.micro_batch_size <= args.sequences:
        parser.error(f"--micro-batch-size must be in 1..{args.sequences}")
    routed = [
        name
        for name in args.methods.split(",")
        if name.strip() in METHODS and METHODS[name.strip()].teachers == "routed"
    ]
    if routed and _microbatches_per_replica(args) < 2:
        parser.error(
            f"--methods {routed[0].strip()} routes each microbatch to one teacher: it needs at "
            f"least 2 microbatches per data-parallel replica (got "
            f"{_microbatches_per_replica(args)}; lower --micro-batch-size or raise --sequences)"
        )
    return args


def _microbatches_per_replica(args: argparse.Namespace) -> int:
    share = args.sequences // layout(args).data_parallel_size(args.nproc)
    return share // (args.micro_batch_size or share)


def layout(args: argparse.Namespace):
    """The student's layout with the teacher's (``ParallelLayout``)."""
    from oprd_mega.parallel.layout import ParallelLayout, TeacherLayout

    return ParallelLayout(
        tp=args.tp,
        pp=args.pp,
        sp=args.sp,
        cp=args.cp,
        teacher=TeacherLayout(tp=args.teacher_tp, pp=args.teacher_pp),
    )


def _layout_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the layout flags for ``--nproc`` ranks, or None."""
    from oprd_mega.models import parse_hf_config
    from oprd_mega.models.shapes import shape_problems

    if args.nproc < 1:
        return f"--nproc must be a positive integer, got {args.nproc}"
    try:
        student = layout(args)
        dp = student.data_parallel_size(args.nproc)
        student.teacher_layout().data_parallel_size(args.nproc)
    except ValueError as exc:
        return f"--nproc {args.nproc} with --tp/--pp/--cp/--sp/--teacher-tp/--teacher-pp: {exc}"
    if args.sequences % dp:
        return f"--sequences {args.sequences} must be divisible by the data-parallel size {dp}"
    teacher_config, student_config, _ = model_configs(args)
    teacher_layout = student.teacher_layout()
    for name, config, flag, at in (
        ("student", student_config, "--", student),
        ("teacher", teacher_config, "--teacher-", teacher_layout),
    ):
        model = parse_hf_config(config, where=f"bench_step {name}")
        for problem in shape_problems(
            model,
            tp=at.tp,
            pp=at.pp,
            name=name,
            cp=at.cp,
            sp=at.sp,
            seq_length=("--seq-len", args.seq_len),
        ):
            prefix = "--" if problem.knob == "cp" else flag
            return f"{prefix}{problem.knob} {problem.value}: {problem.detail}"
    if args.micro_batch_size is not None and (args.sequences // dp) % args.micro_batch_size:
        return (
            f"--micro-batch-size {args.micro_batch_size} must divide the "
            f"{args.sequences // dp} sequence(s) of each data-parallel replica"
        )
    return None


def model_configs(args: argparse.Namespace) -> tuple[dict, dict, str]:
    """Teacher and student ``config.json`` contents, and a label for the report."""
    if args.preset is not None:
        pair = preset(args.preset)
        label = f"{pair.teacher_name} -> {pair.student_name}"
        if args.scale != 1:
            label += f" x{args.scale:g}"
        teacher = scaled(pair.teacher, args.scale, vocab_size=args.vocab)
        student = scaled(pair.student, args.scale, vocab_size=args.vocab)
        return teacher, student, label
    config = {
        "model_type": "qwen3",
        "vocab_size": args.vocab or 151936,
        "hidden_size": args.hidden,
        "intermediate_size": 3 * args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": max(1, args.heads // 4),
        "head_dim": args.hidden // args.heads,
        "max_position_embeddings": args.seq_len,
        "rope_theta": 1e6,
    }
    return config, config, "default (scaled-down Qwen3)"


class _RssPeak:
    """Peak resident set size (bytes) of this process while active, sampled every 1 ms."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * self._page

    def __enter__(self) -> _RssPeak:
        self.peak = self.rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.001)

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def _trim() -> None:
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def run_method(args: argparse.Namespace, name: str) -> dict:
    """Build student and teacher, run warm-up + timed steps, return times and dPeaks."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from oprd_mega.data.microbatches import model_dims
    from oprd_mega.distill.batch import make_microbatch
    from oprd_mega.distill.build import TeacherSetup, build_step, build_teacher
    from oprd_mega.distill.layers import layer_pairs
    from oprd_mega.distill.options import OptimizerOptions
    from oprd_mega.distill.positions import PositionSpec
    from oprd_mega.distill.projection import ProjectionSpec
    from oprd_mega.distill.step import StepOptions
    from oprd_mega.models import build_gpt_model, parse_hf_config
    from oprd_mega.models.builder import resolve_dtype
    from oprd_mega.models.recompute import RecomputeOptions
    from oprd_mega.parallel import init_distributed
    from oprd_mega.parallel.model_groups import init_model_groups
    from oprd_mega.train.throughput import model_flops_utilization, peak_tflops, training_flops

    student_layout = layout(args)
    init_distributed(student_layout)
    own = student_layout.teacher_has_own_layout
    teacher_groups = init_model_groups(student_layout.teacher_layout()) if own else None
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if cuda else "float32")
    dtype = resolve_dtype(dtype_name)
    teacher_config, student_config, _ = model_configs(args)
    s_args = parse_hf_config(student_config, where="bench_step student")
    t_args = parse_hf_config(teacher_config, where="bench_step teacher")
    method = METHODS[name]
    pairs = layer_pairs("all", s_args.num_layers, t_args.num_layers)
    options = StepOptions(
        method=method.kind,
        top_k=method.top_k,
        opd_chunk_tokens=1024,
        overlap_teacher=method.overlap_teacher,
    )
    recompute = RecomputeOptions(**RECOMPUTE[args.recompute])
    student = build_gpt_model(
        s_args, params_dtype=dtype, sequence_parallel=args.sp, recompute=recompute
    )
    # Widths that differ (the Qwen3 presets) go through a learned map, as the paper's runs do.
    projection = (
        ProjectionSpec("full", normalize=True) if s_args.hidden_size != t_args.hidden_size else None
    )
    names = ("teacher",) if method.teachers == "one" else TEACHER_NAMES
    setups = [
        TeacherSetup(
            teacher_name,
            build_teacher(
                t_args,
                pairs,
                options,
                params_dtype=dtype,
                sequence_parallel=args.sp and not own,
                pg_collection=teacher_groups,
            ),
            pairs,
            projection=projection,
            own_layout=own,
        )
        for teacher_name in names
    ]
    step = build_step(student, setups, options, OptimizerOptions(lr=1e-5))
    vocab = min(s_args.vocab_size, t_args.vocab_size)
    generator = torch.Generator().manual_seed(1)
    everything = [
        torch.randint(0, vocab, (args.seq_len,), generator=generator).tolist()
        for _ in range(args.sequences)
    ]
    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    share = args.sequences // dp_size
    sequences = everything[dp_rank * share : (dp_rank + 1) * share]
    spec = PositionSpec("last_k", args.last_k)
    per_microbatch = args.micro_batch_size or share
    microbatches = [
        make_microbatch(
            index,
            sequences[start : start + per_microbatch],
            [args.prompt_len] * len(sequences[start : start + per_microbatch]),
            args.seq_len,
            spec,
        )
        for index, start in enumerate(range(0, share, per_microbatch))
    ]
    if method.teachers == "routed":  # microbatch i to teacher i mod 2
        microbatches = [
            replace(batch, teachers=(TEACHER_NAMES[index % 2],))
            for index, batch in enumerate(microbatches)
        ]
    flops = training_flops(model_dims(s_args), [args.seq_len] * args.sequences)
    device = torch.cuda.get_device_name() if cuda else "cpu"
    peak = args.peak_tflops or (peak_tflops(device, dtype_name) if cuda else None)
    teacher_times: list[float] = []
    per_teacher_times: dict[str, list[float]] = {teacher_name: [] for teacher_name in names}
    times, peaks = [], []
    for index in range(args.steps + 1):
        _trim()
        sampler = _RssPeak()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if cuda else sampler.rss()
        start = time.perf_counter()
        with sampler:
            result = step.run(microbatches)
            if cuda:
                torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        top = torch.cuda.max_memory_allocated() if cuda else sampler.peak
        if index:  # the first step is a warm-up
            times.append(seconds)
            peaks.append(top - base)
            teacher_times.append(result.teacher_seconds)
            for teacher_name, part in result.teachers.items():
                per_teacher_times[teacher_name].append(part.seconds)
    median = statistics.median(times)
    dpeak_per_rank: list = [None] * dist.get_world_size()
    dist.all_gather_object(dpeak_per_rank, max(peaks))
    return {
        "time": median,
        "dpeak": max(peaks),
        "dpeak_per_rank": dpeak_per_rank,
        "memory": "cuda max_memory_allocated"
        if cuda
        else "cpu peak resident set size (host memory, not a GPU's)",
        "recompute": args.recompute,
        "overlap_teacher": method.overlap_teacher,
        "layout": str(student_layout),
        "teacher_time": statistics.median(teacher_times),
        # each teacher's share of the last step (tokens over every replica) and median time
        "teachers": {
            teacher_name: {
                "supervised_tokens": part.supervised_tokens,
                "microbatches": part.microbatches,
                "time": statistics.median(per_teacher_times[teacher_name]),
            }
            for teacher_name, part in result.teachers.items()
        },
        "tokens_per_s": args.sequences * args.seq_len / median,
        "student_tflops": flops / 1e12,
        # the step's FLOPs over every rank's peak
        "mfu": None if peak is None else model_flops_utilization(flops, median, peak * args.nproc),
        "peak_tflops": peak,
        "device": device,
        "dtype": dtype_name,
        "rank": dist.get_rank(),
        "cuda": cuda,
    }


# The parent hands its arguments to each launch here: torchrun's own argparse would otherwise
# read the benchmark's flags (``--nproc`` is an abbreviation of its ``--nproc-per-node``).
ARGV_VARIABLE = "OPRD_BENCH_STEP_ARGV"
# A rank's exception line ("[rank0]: ValueError: ..."), the first of which the parent repeats.
ROOT_ERROR = re.compile(r"^(\[rank\d+\]: )?\w+(Error|Exception): ")


def main(argv: list[str] | None = None) -> int:
    if argv is None and ARGV_VARIABLE in os.environ:
        argv = json.loads(os.environ[ARGV_VARIABLE])
    args = parse_args(argv)
    if args.child:
        result = run_method(args, args.child)
        if result["rank"] == 0:
            print("RESULT " + json.dumps(result), flush=True)
        return 0
    names = [name.strip() for name in args.methods.split(",") if name.strip()]
    for name in names:
        if name not in METHODS:
            raise SystemExit(f"--methods: {name!r} is not one of {list(METHODS)}")
    results = {}
    passthrough = list(argv if argv is not None else sys.argv[1:])
    launcher = [sys.executable]
    if args.nproc > 1:  # one rendezvous per launch on a free port (--standalone); --log-dir:
        # torchrun otherwise leaves a /tmp/torchelastic_* folder per launch (this one goes at exit)
        torchrun_logs = tempfile.TemporaryDirectory(prefix="oprd-bench-step-torchrun-")
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
        launcher += [str(args.nproc), "--log-dir", torchrun_logs.name]
    for name in names:
        out = subprocess.run(
            [*launcher, __file__],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, ARGV_VARIABLE: json.dumps([*passthrough, "--child", name])},
        )
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode or not lines:
            sys.stderr.write(out.stderr[-4000:])
            cause = next(
                (line for line in out.stderr.splitlines() if ROOT_ERROR.search(line)), None
            )
            raise SystemExit(
                f"bench_step: method {name} failed (exit {out.returncode})"
                + (f": {cause.strip()}" if cause else "")
            )
        results[name] = json.loads(lines[-1][len("RESULT ") :])
        print(f"# {name}: {json.dumps(results[name])}", flush=True)  # partial results survive
    reference = results.get("opd-top16")
    print(
        f"# shape: {model_configs(args)[2]}, {args.sequences} x {args.seq_len} tokens, "
        f"recompute {args.recompute}, layout {layout(args)} on {args.nproc} rank(s)"
    )
    print(
        f"{'method':<22} {'time_s':>9} {'dpeak_MiB':>10} {'time/top16':>11} {'dpeak/top16':>12} "
        f"{'tokens/s':>10} {'teacher_s':>10} {'mfu':>7}"
    )
    for name, value in results.items():
        time_ratio = value["time"] / reference["time"] if reference else float("nan")
        peak_ratio = value["dpeak"] / reference["dpeak"] if reference else float("nan")
        mfu = "-" if value["mfu"] is None else f"{100 * value['mfu']:.1f}%"
        print(
            f"{name:<22} {value['time']:>9.3f} {value['dpeak'] / 2**20:>10.1f} "
            f"{time_ratio:>11.3f} {peak_ratio:>12.3f} {value['tokens_per_s']:>10.0f} "
            f"{value['teacher_time']:>10.3f} {mfu:>7}"
        )
    for name, value in results.items():
        ranks = ", ".join(
            f"r{rank}={peak / 2**20:.1f}" for rank, peak in enumerate(value["dpeak_per_rank"])
        )
        print(f"# dpeak per rank (MiB, {value['memory']}): {name}: {ranks}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"args": vars(args), "results": results}, handle, indent=2)
    if "oprd" in results and "oprd-overlap" in results:
        overlap, plain = results["oprd-overlap"], results["oprd"]
        print(
            f"ratio oprd-overlap/oprd time={overlap['time'] / plain['time']:.3f} "
            f"dpeak={overlap['dpeak'] / plain['dpeak']:.3f}"
        )
    for name in ("oprd-2teachers", "oprd-2teachers-routed"):
        if "oprd" in results and name in results:
            two, one = results[name], results["oprd"]
            print(
                f"ratio {name}/oprd time={two['time'] / one['time']:.3f} "
                f"teacher_time={two['teacher_time'] / one['teacher_time']:.3f} "
                f"dpeak={two['dpeak'] / one['dpeak']:.3f}"
            )
    if reference and "oprd" in results:
        print(
            f"ratio oprd/opd-top16 time={results['oprd']['time'] / reference['time']:.3f} "
            f"dpeak={results['oprd']['dpeak'] / reference['dpeak']:.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
