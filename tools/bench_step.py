#!/usr/bin/env python
"""One full distillation step (teacher pass, student forward/backward, optimizer) per method.

Runs ``oprd``, ``opd-top1`` and ``opd-top16`` on the same microbatches, each in its own
process (a clean allocator), and prints the median step time and the peak memory above the
pre-step baseline (the paper's dPeak) side by side, with ratios to OPD top-16. The last line is
``ratio oprd/opd-top16 time=X dpeak=Y``.

Memory: on CUDA ``torch.cuda.max_memory_allocated`` above the allocation before the step; on
CPU the peak resident set size (sampled every millisecond) above the resident size before the
step, after returning freed heap memory to the system (``malloc_trim``).

Default shape (scaled down, the paper's proportions): 4 layers, hidden 512, vocabulary 151,936,
2 sequences of 2,048 tokens (1,024 prompt + 1,024 response), last_k = 512, all layers tapped.
Run single-process: ``python tools/bench_step.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import statistics
import subprocess
import sys
import threading
import time

METHODS = {"oprd": ("oprd", 16), "opd-top1": ("opd-top1", 16), "opd-top16": ("opd-topk", 16)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--sequences", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--last-k", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


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

    from oprd_mega.distill.batch import make_microbatch
    from oprd_mega.distill.build import build_step, build_teacher
    from oprd_mega.distill.layers import layer_pairs
    from oprd_mega.distill.options import OptimizerOptions
    from oprd_mega.distill.positions import PositionSpec
    from oprd_mega.distill.step import StepOptions
    from oprd_mega.models import build_gpt_model, parse_hf_config
    from oprd_mega.parallel import init_distributed

    init_distributed()
    torch.manual_seed(0)
    config = {
        "model_type": "qwen3",
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "intermediate_size": 3 * args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": max(1, args.heads // 4),
        "head_dim": args.hidden // args.heads,
        "max_position_embeddings": args.seq_len,
        "rope_theta": 1e6,
    }
    model_args = parse_hf_config(config, where="bench_step")
    method, k = METHODS[name]
    pairs = layer_pairs("all", args.layers, args.layers)
    options = StepOptions(method=method, top_k=k, opd_chunk_tokens=1024)
    student = build_gpt_model(model_args)
    teacher = build_teacher(model_args, pairs, options)
    step = build_step(student, teacher, pairs, options, OptimizerOptions(lr=1e-5))
    generator = torch.Generator().manual_seed(1)
    sequences = [
        torch.randint(0, args.vocab, (args.seq_len,), generator=generator).tolist()
        for _ in range(args.sequences)
    ]
    spec = PositionSpec("last_k", args.last_k)
    microbatches = [
        make_microbatch(0, sequences, [args.prompt_len] * args.sequences, args.seq_len, spec)
    ]
    cuda = torch.cuda.is_available()
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
            step.run(microbatches)
            if cuda:
                torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() if cuda else sampler.peak
        if index:  # the first step is a warm-up
            times.append(seconds)
            peaks.append(peak - base)
    return {"time": statistics.median(times), "dpeak": max(peaks), "cuda": cuda}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        result = run_method(args, args.child)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    names = [name.strip() for name in args.methods.split(",") if name.strip()]
    for name in names:
        if name not in METHODS:
            raise SystemExit(f"--methods: {name!r} is not one of {list(METHODS)}")
    results = {}
    passthrough = list(argv if argv is not None else sys.argv[1:])
    for name in names:
        out = subprocess.run(
            [sys.executable, __file__, *passthrough, "--child", name],
            capture_output=True,
            text=True,
            check=False,
        )
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode or not lines:
            sys.stderr.write(out.stderr[-4000:])
            raise SystemExit(f"bench_step: method {name} failed (exit {out.returncode})")
        results[name] = json.loads(lines[-1][len("RESULT ") :])
        print(f"# {name}: {json.dumps(results[name])}", flush=True)  # partial results survive
    reference = results.get("opd-top16")
    print(f"{'method':<10} {'time_s':>9} {'dpeak_MiB':>10} {'time/top16':>11} {'dpeak/top16':>12}")
    for name, value in results.items():
        time_ratio = value["time"] / reference["time"] if reference else float("nan")
        peak_ratio = value["dpeak"] / reference["dpeak"] if reference else float("nan")
        print(
            f"{name:<10} {value['time']:>9.3f} {value['dpeak'] / 2**20:>10.1f} "
            f"{time_ratio:>11.3f} {peak_ratio:>12.3f}"
        )
    if reference and "oprd" in results:
        print(
            f"ratio oprd/opd-top16 time={results['oprd']['time'] / reference['time']:.3f} "
            f"dpeak={results['oprd']['dpeak'] / reference['dpeak']:.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
