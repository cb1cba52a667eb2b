"""Command line of the checkpoint converter (``oprd-convert-checkpoint``).

oprd-convert-checkpoint hf-to-mcore --hf DIR --mcore DIR [--make-vocab-size-divisible-by 128]
oprd-convert-checkpoint mcore-to-hf --mcore DIR --hf DIR
torchrun --nproc-per-node N*M tools/convert_checkpoint.py verify --hf DIR --mcore DIR --tp N
    [--pp M [--decoder-first-pipeline-num-layers A] [--decoder-last-pipeline-num-layers B]]

Conversion itself has no layout (the checkpoint loads at any TP/PP and pipeline split); verify
runs the one given.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from torch.distributed.checkpoint import CheckpointException

from oprd_mega.convert.dcp_files import damaged_files
from oprd_mega.lifetime import exit_on_sigterm
from oprd_mega.models.shapes import PipelineSplit, split_problem

# Errors caused by the user's input: reported in one line, exit status 2.
_INPUT_ERRORS = (FileNotFoundError, FileExistsError, ValueError)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oprd-mega convert",
        description="Convert Llama/Qwen2/Qwen3 checkpoints between Hugging Face and Megatron.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    h2m = sub.add_parser("hf-to-mcore", help="HF safetensors -> Megatron torch_dist")
    h2m.add_argument("--hf", required=True, help="Hugging Face model directory")
    h2m.add_argument("--mcore", required=True, help="new Megatron checkpoint directory")
    h2m.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="convert tensors holding NaN or infinity (refused by default, naming the tensor)",
    )
    h2m.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=128,
        help="pad the vocabulary with zero rows to a multiple of this (128); the checkpoint "
        "loads at any TP: where TP does not divide the padded size, the model pads to a "
        "multiple of this x TP at load, as Megatron-LM does",
    )
    m2h = sub.add_parser("mcore-to-hf", help="Megatron torch_dist -> HF safetensors")
    m2h.add_argument("--mcore", required=True, help="Megatron checkpoint directory")
    m2h.add_argument("--hf", required=True, help="new Hugging Face model directory")
    m2h.add_argument("--max-shard-gb", type=float, default=2.0, help="safetensors shard size")
    ver = sub.add_parser("verify", help="compare with transformers layer by layer (torchrun)")
    ver.add_argument("--hf", required=True, help="Hugging Face model directory")
    ver.add_argument("--mcore", required=True, help="Megatron checkpoint directory")
    ver.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    ver.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    ver.add_argument("--sp", action="store_true", help="sequence parallelism (needs --tp > 1)")
    for end in ("first", "last"):
        ver.add_argument(
            f"--decoder-{end}-pipeline-num-layers",
            type=int,
            default=None,
            help=f"layers on the {end} pipeline stage, as Megatron-LM's flag (default: even "
            "stages, or an automatic uneven split when --pp does not divide the depth)",
        )
    ver.add_argument("--batch", type=int, default=2, help="sequences in the test batch (2)")
    ver.add_argument("--seq-len", type=int, default=32, help="tokens per sequence (32)")
    ver.add_argument("--seed", type=int, default=0, help="seed of the random tokens (0)")
    ver.add_argument("--tolerance", type=float, default=None, help="max relative difference")
    for p in (h2m, m2h):
        p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def _same_architecture(hf_args, mcore_args, hf: str, mcore: str) -> None:
    """Raise ValueError naming every architecture field where the two models differ."""
    ours, theirs = mcore_args.to_dict(), hf_args.to_dict()
    differ = [
        f"{name} {theirs[name]!r} vs {ours.get(name)!r}"
        for name in theirs
        if name not in ("initializer_range", "dtype") and theirs[name] != ours.get(name)
    ]
    if differ:
        raise ValueError(
            f"--hf {hf} and --mcore {mcore} are different models: " + ", ".join(differ)
        )


def _pipeline_split(ns: argparse.Namespace, num_layers: int) -> PipelineSplit | None:
    """The hand-set split of the verify flags (None without them); ValueError naming the flags
    when it does not fit the model's depth at --pp."""
    first, last = ns.decoder_first_pipeline_num_layers, ns.decoder_last_pipeline_num_layers
    if first is None and last is None:
        return None
    flags = " ".join(
        f"--decoder-{end}-pipeline-num-layers {value}"
        for end, value in (("first", first), ("last", last))
        if value is not None
    )
    try:
        split = PipelineSplit(first=first, last=last)
    except ValueError as exc:
        raise ValueError(f"{flags}: {exc}") from exc
    problem = split_problem(num_layers, ns.pp, split)
    if problem is not None:
        raise ValueError(f"{flags} with --pp {ns.pp}: the model has {num_layers} layers; {problem}")
    return split


def _verify(ns: argparse.Namespace) -> int:
    import torch.distributed as dist

    from oprd_mega.convert.convert import checkpoint_dtype
    from oprd_mega.convert.mcore_io import read_mcore_args
    from oprd_mega.convert.verify import TOLERANCE, verify
    from oprd_mega.models.hf_config import load_hf_config
    from oprd_mega.parallel import ParallelLayout, init_distributed

    # clear errors before any process group exists
    mcore_args = read_mcore_args(ns.mcore)
    _same_architecture(load_hf_config(ns.hf), mcore_args, ns.hf, ns.mcore)
    layout = ParallelLayout(tp=ns.tp, pp=ns.pp, sp=ns.sp)
    split = _pipeline_split(ns, mcore_args.num_layers)
    tolerance = ns.tolerance if ns.tolerance is not None else TOLERANCE[checkpoint_dtype(ns.mcore)]
    info = init_distributed(layout)
    diffs = verify(
        ns.hf,
        ns.mcore,
        sequence_parallel=ns.sp,
        batch=ns.batch,
        seq_len=ns.seq_len,
        seed=ns.seed,
        pipeline_split=split,
    )
    status = [0]
    if info.rank == 0:
        print(f"verify {layout} (world {info.world_size}), tolerance max_rel <= {tolerance:g}")
        print(f"{'tensor':<12} {'max_abs':>12} {'max_rel':>12}")
        for d in diffs or []:
            flag = "" if d.max_rel <= tolerance else "  FAIL"
            print(f"{d.name:<12} {d.max_abs:>12.3e} {d.max_rel:>12.3e}{flag}")
        failed = [d.name for d in diffs or [] if d.max_rel > tolerance]
        print("FAILED: " + ", ".join(failed) if failed else "OK: all within tolerance")
        status[0] = 1 if failed else 0
    dist.broadcast_object_list(status, src=0)
    return status[0]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the process exit status."""
    ns = _parser().parse_args(argv)
    exit_on_sigterm()  # a terminated conversion removes its temporary folder
    try:
        if ns.command == "hf-to-mcore":
            from oprd_mega.convert.hf_io import HFCheckpointReader
            from oprd_mega.models.hf_config import load_hf_config

            # Validate before importing Megatron (seconds), so bad input fails fast.
            HFCheckpointReader(ns.hf).validate(load_hf_config(ns.hf))
            if ns.make_vocab_size_divisible_by < 1:
                raise ValueError(
                    "--make-vocab-size-divisible-by must be a positive integer, got "
                    f"{ns.make_vocab_size_divisible_by}"
                )
            from oprd_mega.convert.convert import hf_to_mcore

            out = hf_to_mcore(
                ns.hf,
                ns.mcore,
                make_vocab_size_divisible_by=ns.make_vocab_size_divisible_by,
                progress=not ns.no_progress,
                allow_nonfinite=ns.allow_nonfinite,
            )
            print(f"wrote Megatron checkpoint {out}")
            return 0
        if ns.command == "mcore-to-hf":
            from oprd_mega.convert.convert import mcore_to_hf

            max_bytes = int(ns.max_shard_gb * 1024**3)
            out = mcore_to_hf(
                ns.mcore, ns.hf, max_shard_bytes=max_bytes, progress=not ns.no_progress
            )
            print(f"wrote Hugging Face checkpoint {out}")
            return 0
        return _verify(ns)
    except _INPUT_ERRORS as exc:
        print(f"oprd-convert-checkpoint {ns.command}: error: {exc}", file=sys.stderr)
        return 2
    except CheckpointException as exc:  # torch DCP's (a BaseException): name the file
        damaged = "; ".join(damaged_files(ns.mcore)) or f"{type(exc).__name__}"
        print(
            f"oprd-convert-checkpoint {ns.command}: error: cannot read {ns.mcore}: {damaged}",
            file=sys.stderr,
        )
        return 2
    finally:
        from oprd_mega.parallel.distributed import destroy_distributed

        if "megatron.core" in sys.modules:
            destroy_distributed()


if __name__ == "__main__":
    sys.exit(main())
