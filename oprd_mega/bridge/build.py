"""OPRD-Bridge stage 1 end to end (``tools/build_bridge.py``, ``oprd-build-bridge``).

Under torchrun at a TP/PP layout (data parallel over the rest of the world):

1. rank 0 samples student rollouts from a rollout server (launched, or attached with
   ``--server-url``; or read back with ``--samples``), writes ``samples.jsonl`` and broadcasts
   the token sequences;
2. every rank plans the same rows: the supervised positions of every rollout (the step's
   position rule), at most ``--max-rows`` of them chosen uniformly (:func:`select_rows`), the
   rollouts split contiguously over data-parallel ranks;
3. both models (Megatron GPT models truncated at the deepest paired layer) run forward only;
   the stage owning a layer keeps its selected rows and, per teacher layer, their streaming
   covariance (merged over data-parallel ranks); rank 0 gathers everything;
4. rank 0 takes P_T/mu_T per teacher layer (one float64 ``eigh``), fits P_S per layer pair and
   rank, prints the cosine table and writes ``bridge-r{r}.safetensors`` per swept rank plus
   ``report.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from oprd_mega.cli_args import DTYPES
from oprd_mega.distill.layers import LAYER_MODES, layer_pairs, source_layers
from oprd_mega.distill.positions import POSITION_ANCHORS, POSITION_MODES, PositionSpec
from oprd_mega.models.hf_config import HFModelArgs, load_hf_config
from oprd_mega.models.shapes import shape_problems
from oprd_mega.parallel.distributed import RemoteError, on_rank0
from oprd_mega.rollout.sampling import SamplingConfig

from .file import BridgeFile, BridgeMetadata, ModelIdentity, save_bridge_file
from .plan import PairedSequence
from .rollouts import Rollout, ServerOptions
from .sampling import DEFAULT_MAX_ROWS
from .student_map import FitConfig
from .subspace import Subspace, sweep_ranks
from .sweep import RankFit

if TYPE_CHECKING:
    from oprd_mega.parallel import DistributedInfo

    from .states import GatheredStates

PROG = "oprd-mega bridge"
DEFAULT_RANKS = (1, 2, 4, 8, 16, 32, 0)


class BuildError(ValueError):
    """Bad input to the tool; the message names the flag or file to fix."""


def build_parser() -> argparse.ArgumentParser:
    """The tool's command line."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="OPRD-Bridge stage 1: sample student rollouts, collect both models' hidden "
        "states at the supervised positions, fit P_T/mu_T (teacher PCA) and P_S per layer pair "
        "and rank, and write one bridge file per rank. Run under torchrun.",
    )
    io = parser.add_argument_group("inputs and outputs")
    io.add_argument("--student", required=True, help="student Hugging Face model directory")
    io.add_argument("--teacher", required=True, help="teacher Hugging Face model directory")
    io.add_argument("--prompts", help="JSONL/Parquet prompt file (not needed with --samples)")
    io.add_argument("--out", required=True, help="output directory")
    io.add_argument("--prompt-key", default="prompt", help="prompt column (default prompt)")
    io.add_argument("--chat-template", action="store_true", help="render chat prompts")
    io.add_argument("--max-prompts", type=int, default=2048, help="first N prompts (2048)")
    io.add_argument("--max-prompt-length", type=int, default=None, help="skip longer prompts")
    io.add_argument("--samples", help="reuse a samples.jsonl of an earlier run (no server)")
    roll = parser.add_argument_group("rollouts")
    roll.add_argument("--samples-per-prompt", type=int, default=1, help="responses per prompt (1)")
    roll.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (1.0)")
    roll.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (1.0)")
    roll.add_argument("--max-new-tokens", type=int, default=1024, help="tokens per response")
    roll.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "sglang", "embedded"),
        help="server to launch (auto: SGLang when installed)",
    )
    roll.add_argument("--port", type=int, default=30600, help="launched server's port (30600)")
    roll.add_argument(
        "--server-url", action="append", default=[], help="attach to a running server (repeat)"
    )
    roll.add_argument("--health-timeout", type=float, default=900.0, help="seconds (900)")
    model = parser.add_argument_group("models and states")
    model.add_argument("--tp", type=int, default=1, help="tensor parallel size (1)")
    model.add_argument("--pp", type=int, default=1, help="pipeline parallel size (1)")
    model.add_argument(
        "--dtype",
        default="float32",
        choices=DTYPES,
        help="dtype of both models' forward passes",
    )
    model.add_argument(
        "--layers", default="all", help=f"student layers: {', '.join(LAYER_MODES)} or 1,3,..."
    )
    model.add_argument(
        "--positions", default="all", choices=POSITION_MODES, help="supervised positions (all)"
    )
    model.add_argument("--positions-k", type=int, default=2000, help="k of first_k/last_k")
    model.add_argument(
        "--positions-anchor", default="token", choices=POSITION_ANCHORS, help="position anchor"
    )
    model.add_argument("--max-rows", type=int, default=DEFAULT_MAX_ROWS, help="(16384)")
    model.add_argument(
        "--max-tokens-per-microbatch", type=int, default=8192, help="padded tokens (8192)"
    )
    fit = parser.add_argument_group("P_S fits")
    fit.add_argument(
        "--ranks",
        default=None,
        help="comma-separated ranks, 0 = full (default 1,2,4,8,16,32,0 up to d_T)",
    )
    fit.add_argument("--map", default="linear", choices=("linear", "mlp"), help="P_S kind")
    fit.add_argument("--mlp-hidden", type=int, default=256, help="MLP width (256)")
    fit.add_argument("--epochs", type=int, default=20, help="most epochs per fit (20)")
    fit.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate (1e-2)")
    fit.add_argument("--fit-batch-size", type=int, default=256, help="rows per step (256)")
    fit.add_argument(
        "--heldout-fraction", type=float, default=0.1, help="rows held out for the cosine (0.1)"
    )
    fit.add_argument(
        "--patience", type=int, default=3, help="epochs without improvement before stopping (3)"
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling, row choice and fit seed")
    parser.add_argument(
        "--timeout-minutes",
        type=int,
        default=120,
        help="collective timeout: how long the other ranks wait for rank 0's rollouts (120)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


# ----------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class Inputs:
    """Everything checked before any process group exists (identical on every rank)."""

    student: HFModelArgs
    teacher: HFModelArgs
    pairs: list[tuple[int, int]]
    ranks: list[int]
    positions: PositionSpec
    fit: FitConfig

    @property
    def student_layers(self) -> list[int]:
        """Paired student layers, ascending."""
        return [s for s, _ in self.pairs]

    @property
    def teacher_layers(self) -> list[int]:
        """Paired teacher layers, ascending and unique."""
        return sorted({t for _, t in self.pairs})


def read_model(path: str, flag: str) -> HFModelArgs:
    """A model directory's config, with its weights checked against it."""
    from oprd_mega.convert.hf_io import HFCheckpointReader

    directory = Path(path)
    if not directory.is_dir():
        raise BuildError(f"{flag}: model directory not found: {directory}")
    try:
        args = load_hf_config(directory)
        HFCheckpointReader(directory).validate(args)
    except (FileNotFoundError, ValueError) as exc:
        raise BuildError(f"{flag} {directory}: {exc}") from exc
    return args


def parse_layers(text: str) -> str | list[int]:
    """``--layers``: a mode name or comma-separated 1-based layer numbers."""
    if text in LAYER_MODES:
        return text
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise BuildError(
            f"--layers {text!r}: not one of {LAYER_MODES} nor comma-separated layer numbers"
        ) from None


def resolve_ranks(text: str | None, d_teacher: int) -> list[int]:
    """``--ranks`` as ascending unique ranks (0 = d_T); the default keeps those up to d_T."""
    if text is None:
        return sweep_ranks([r for r in DEFAULT_RANKS if r <= d_teacher], d_teacher)
    try:
        ranks = [int(part) for part in text.split(",")]
    except ValueError:
        raise BuildError(f"--ranks {text!r}: not comma-separated integers") from None
    for rank in ranks:
        if rank < 0:
            raise BuildError(f"--ranks: {rank} is negative (0 means the full rank d_T)")
        if rank > d_teacher:
            raise BuildError(
                f"--ranks: {rank} is larger than the teacher's hidden size d_T = {d_teacher} "
                "(0 means the full rank)"
            )
    return sweep_ranks(ranks, d_teacher)


def check_layout(ns: argparse.Namespace, inputs: Inputs, world_size: int) -> None:
    """TP must divide both models' head counts, vocabularies and FFN widths; every pipeline
    stage of both truncated models needs a layer; tp*pp must divide the world."""
    if ns.tp < 1 or ns.pp < 1:
        raise BuildError(f"--tp {ns.tp} / --pp {ns.pp}: must be positive")
    for name, args, depth in (
        ("student", inputs.student, max(inputs.student_layers)),
        ("teacher", inputs.teacher, max(inputs.teacher_layers)),
    ):
        problems = shape_problems(args, tp=ns.tp, pp=ns.pp, num_layers=depth, name=name)
        if problems:
            raise BuildError(
                "; ".join(f"--{p.knob} {p.value}: {p.detail}" for p in problems)
                + " (up to the deepest paired layer)"
            )
    if world_size % (ns.tp * ns.pp):
        raise BuildError(
            f"--tp {ns.tp} --pp {ns.pp}: the world size {world_size} (torchrun "
            "--nproc-per-node) is not a multiple of tp * pp"
        )


def check_inputs(ns: argparse.Namespace, world_size: int) -> Inputs:
    """Validate every flag and both models (cheap: configs and weight headers only)."""
    student = read_model(ns.student, "--student")
    teacher = read_model(ns.teacher, "--teacher")
    if ns.samples is None and ns.prompts is None:
        raise BuildError("--prompts: a prompt file is needed (or --samples from an earlier run)")
    if ns.prompts is not None and not Path(ns.prompts).is_file():
        raise BuildError(f"--prompts: file not found: {ns.prompts}")
    if ns.samples is not None and not Path(ns.samples).is_file():
        raise BuildError(f"--samples: file not found: {ns.samples}")
    try:
        pairs = layer_pairs(
            parse_layers(ns.layers),
            student.num_layers,
            teacher.num_layers,
            source_layers(student, teacher),
        )
    except ValueError as exc:
        raise BuildError(f"--layers {ns.layers}: {exc}") from exc
    for flag, value, low in (
        ("--max-rows", ns.max_rows, 2),
        ("--max-prompts", ns.max_prompts, 1),
        ("--samples-per-prompt", ns.samples_per_prompt, 1),
        ("--max-new-tokens", ns.max_new_tokens, 1),
        ("--max-tokens-per-microbatch", ns.max_tokens_per_microbatch, 1),
    ):
        if value < low:
            raise BuildError(f"{flag}: must be at least {low}, got {value}")
    try:
        positions = PositionSpec(ns.positions, ns.positions_k, ns.positions_anchor)
        fit = FitConfig(
            kind=ns.map,
            mlp_hidden=ns.mlp_hidden,
            epochs=ns.epochs,
            batch_size=ns.fit_batch_size,
            lr=ns.lr,
            heldout_fraction=ns.heldout_fraction,
            patience=ns.patience,
            seed=ns.seed,
        )
    except ValueError as exc:  # messages name positions.* / fit.* fields
        raise BuildError(f"{exc} (see --positions*, --map/--epochs/--lr/... in --help)") from exc
    inputs = Inputs(
        student, teacher, pairs, resolve_ranks(ns.ranks, teacher.hidden_size), positions, fit
    )
    check_layout(ns, inputs, world_size)
    return inputs


# ----------------------------------------------------------------------------- rank 0 work


def obtain_rollouts(ns: argparse.Namespace, out: Path, tokenizer: Any) -> list[Rollout]:
    """Rank 0: the rollouts, sampled now (written to ``samples.jsonl``) or read back."""
    from oprd_mega.data.prompts import PromptDataError, load_prompts

    from .rollouts import read_samples, sample_rollouts, write_samples

    if ns.samples is not None:
        return read_samples(ns.samples)
    try:
        prompts = load_prompts(
            ns.prompts,
            tokenizer,
            prompt_key=ns.prompt_key,
            chat_template=ns.chat_template,
            max_prompt_length=ns.max_prompt_length,
            on_too_long="skip",
        )[: ns.max_prompts]
    except PromptDataError as exc:
        raise BuildError(f"--prompts / --prompt-key / --chat-template: {exc}") from exc
    if not prompts:
        raise BuildError(f"--prompts {ns.prompts}: no prompt within --max-prompt-length")
    server = ServerOptions(
        model_path=ns.student,
        urls=tuple(ns.server_url),
        backend=ns.backend,
        port=ns.port,
        log_dir=str(out / "logs"),
        health_timeout_s=ns.health_timeout,
    )
    sampling = SamplingConfig(
        n=ns.samples_per_prompt,
        temperature=ns.temperature,
        top_p=ns.top_p,
        max_new_tokens=ns.max_new_tokens,
        sampling_seed=ns.seed,
    )
    rollouts = sample_rollouts(prompts, server, sampling, progress=not ns.no_progress)
    write_samples(out / "samples.jsonl", rollouts)
    return rollouts


@dataclass(frozen=True)
class Prepared:
    """Rank 0's result, broadcast: the paired sequences and how they were paired."""

    rollouts: int
    sequences: list[PairedSequence]
    alignment: str
    skipped: int = 0


def teacher_prompts(ns: argparse.Namespace, tokenizer: Any) -> dict[int, tuple[int, ...]]:
    """Prompt-file row -> the prompt rendered and tokenized for the teacher."""
    from oprd_mega.data.prompts import PromptDataError, load_prompts

    if ns.prompts is None:
        raise BuildError(
            "--prompts: the tokenizers differ, so the teacher's prompts are rendered from the "
            "prompt file (needed with --samples too)"
        )
    try:
        prompts = load_prompts(
            ns.prompts, tokenizer, prompt_key=ns.prompt_key, chat_template=ns.chat_template
        )
    except PromptDataError as exc:
        raise BuildError(f"--prompts (teacher's prompts): {exc}") from exc
    return {p.index: p.prompt_ids for p in prompts}


def prepare(ns: argparse.Namespace, inputs: Inputs, out: Path) -> Prepared:
    """Rank 0: rollouts and the sequences both models read (one tokenization when the
    vocabularies agree, else the teacher's own, aligned by last character)."""
    from transformers import AutoTokenizer

    from .rollouts import paired_sequences, same_vocabulary
    from .tokens import cross_tokenizer_sequence

    out.mkdir(parents=True, exist_ok=True)
    student_tokenizer = AutoTokenizer.from_pretrained(ns.student)
    teacher_tokenizer = AutoTokenizer.from_pretrained(ns.teacher)
    rollouts = obtain_rollouts(ns, out, student_tokenizer)
    if same_vocabulary(student_tokenizer, teacher_tokenizer):
        sequences = paired_sequences(rollouts, inputs.positions)
        return Prepared(len(rollouts), sequences, "same_tokenizer")
    prompts = teacher_prompts(ns, teacher_tokenizer)
    sequences, skipped = [], 0
    for rollout in rollouts:
        if rollout.prompt_index not in prompts:
            raise BuildError(
                f"--samples: prompt_index {rollout.prompt_index} is not a row of --prompts "
                f"{ns.prompts}"
            )
        sequence, missed = cross_tokenizer_sequence(
            rollout.prompt_ids,
            rollout.response_ids,
            prompts[rollout.prompt_index],
            student_tokenizer,
            teacher_tokenizer,
            inputs.positions,
        )
        sequences.append(sequence)
        skipped += missed
    return Prepared(len(rollouts), sequences, "last_character", skipped)


def fit_all(
    states: GatheredStates, inputs: Inputs, rows: int, device: torch.device, progress: bool
) -> tuple[dict[int, Subspace], list[RankFit]]:
    """P_T/mu_T per teacher layer and the P_S sweep per pair, from the gathered states."""
    from tqdm import tqdm

    from .subspace import principal_subspace
    from .sweep import fit_sweep

    subspaces = {t: principal_subspace(states.streams[t]) for t in inputs.teacher_layers}
    fits: list[RankFit] = []
    for s, t in tqdm(inputs.pairs, desc="P_S fits", unit="pair", disable=not progress):
        student, teacher = states.student[s], states.teacher[t]
        if not student.shape[0] == teacher.shape[0] == rows == states.streams[t].count:
            raise RuntimeError(
                f"layer pair ({s}, {t}): gathered {student.shape[0]} student and "
                f"{teacher.shape[0]} teacher rows, {states.streams[t].count} in the covariance, "
                f"expected {rows}"
            )
        fits += fit_sweep(
            student.to(device), teacher, subspaces[t], inputs.ranks, inputs.fit, layer_pair=(s, t)
        )
    return subspaces, fits


def write_bridges(
    out: Path,
    ns: argparse.Namespace,
    inputs: Inputs,
    subspaces: dict[int, Subspace],
    fits: Sequence[RankFit],
    rows: int,
    alignment: str,
) -> dict[int, Path]:
    """``bridge-r{r}.safetensors`` for every swept rank, with its metadata and report rows."""
    student = ModelIdentity.from_args(inputs.student, ns.student)
    teacher = ModelIdentity.from_args(inputs.teacher, ns.teacher)
    paths = {}
    for rank in inputs.ranks:
        mine = [f for f in fits if f.rank == rank]
        metadata = BridgeMetadata(
            rank=rank,
            layer_pairs=tuple(inputs.pairs),
            student=student,
            teacher=teacher,
            student_map=inputs.fit.kind,
            normalize=True,
            alignment=alignment,
            rows=rows,
            seed=ns.seed,
            report=tuple(f.row() for f in mine),
        )
        bridge = BridgeFile(
            metadata,
            student={f.student_layer: f.fit.map for f in mine},
            teacher={t: (s.projection(rank), s.mean) for t, s in subspaces.items()},
        )
        paths[rank] = save_bridge_file(bridge, out / f"bridge-r{rank}.safetensors")
    return paths


def write_report(path: Path, summary: dict[str, Any], fits: Sequence[RankFit]) -> Path:
    """``report.json``: the run's summary and one row per (layer pair, rank)."""
    report = {**summary, "fits": [f.row() for f in fits]}
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- the run


def build_models(ns: argparse.Namespace, inputs: Inputs) -> tuple[Any, Any]:
    """Both models truncated at their deepest paired layer, HF weights loaded, eval mode."""
    from oprd_mega.convert.hf_io import HFCheckpointReader
    from oprd_mega.convert.mcore_io import load_hf_weights
    from oprd_mega.models import build_truncated_model, resolve_dtype

    dtype = resolve_dtype(ns.dtype)
    models = []
    for path, args, depth in (
        (ns.student, inputs.student, max(inputs.student_layers)),
        (ns.teacher, inputs.teacher, max(inputs.teacher_layers)),
    ):
        model = build_truncated_model(args, depth, params_dtype=dtype)
        load_hf_weights(model, args, HFCheckpointReader(path))
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
        models.append(model)
    return models[0], models[1]


@dataclass
class Collected:
    """What rank 0 holds after the forwards: gathered states (None elsewhere) and counts."""

    states: GatheredStates | None
    prepared: Prepared
    supervised_rows: int
    rows: int


def collect(
    ns: argparse.Namespace, inputs: Inputs, info: DistributedInfo, timings: dict[str, float]
) -> Collected:
    """Rollouts on rank 0, the shared row plan, both models' forwards, the gather to rank 0."""
    from megatron.core import parallel_state
    from tqdm import tqdm

    from .plan import data_parallel_share, microbatches, plan_work
    from .sampling import select_rows
    from .states import collect_states, gather_states, merge_streams, owned_layers

    start = time.perf_counter()
    prepared = on_rank0(lambda: prepare(ns, inputs, Path(ns.out)), "to prepare the run")
    timings["rollouts_s"] = time.perf_counter() - start
    sequences, count = prepared.sequences, prepared.rollouts
    counts = [s.rows for s in sequences]
    total = sum(counts)
    if total < 2:
        raise BuildError(
            f"the {count} rollouts hold {total} supervised token row(s); at least 2 are needed "
            "(more --max-prompts, --samples-per-prompt or --max-new-tokens, or --positions all)"
        )
    selected = select_rows(total, ns.max_rows, ns.seed)
    share, first_row = data_parallel_share(
        counts,
        parallel_state.get_data_parallel_world_size(),
        parallel_state.get_data_parallel_rank(),
    )
    batches = microbatches(
        plan_work(sequences, selected, share, first_row), ns.max_tokens_per_microbatch
    )
    start = time.perf_counter()
    student, teacher = build_models(ns, inputs)
    timings["load_s"] = time.perf_counter() - start
    start = time.perf_counter()
    quiet = ns.no_progress or info.rank != 0
    with tqdm(total=len(batches), desc="hidden states", unit="batch", disable=quiet) as bar:
        states = collect_states(
            student, teacher, batches, inputs.student_layers, inputs.teacher_layers, bar.update
        )
    owned = {"student": owned_layers(student), "teacher": owned_layers(teacher)}
    mine = [t for t in inputs.teacher_layers if t in owned["teacher"]]
    streams = merge_streams(states, mine, inputs.teacher.hidden_size)
    gathered = gather_states(
        states,
        streams,
        {"student": inputs.student_layers, "teacher": inputs.teacher_layers},
        owned,
        {"student": inputs.student.hidden_size, "teacher": inputs.teacher.hidden_size},
    )
    timings["states_s"] = time.perf_counter() - start
    return Collected(gathered, prepared, total, int(selected.numel()))


def finish(
    ns: argparse.Namespace,
    inputs: Inputs,
    collected: Collected,
    device: torch.device,
    timings: dict[str, float],
) -> None:
    """Rank 0: fit, write the bridges and the report, print the cosine table."""
    from megatron.core import parallel_state

    from .sweep import format_report

    out = Path(ns.out)
    assert collected.states is not None, "finish runs on global rank 0 only"
    start = time.perf_counter()
    subspaces, fits = fit_all(
        collected.states, inputs, collected.rows, device, progress=not ns.no_progress
    )
    timings["fit_s"] = time.perf_counter() - start
    prepared = collected.prepared
    paths = write_bridges(out, ns, inputs, subspaces, fits, collected.rows, prepared.alignment)
    summary = {
        "student": ns.student,
        "teacher": ns.teacher,
        "layout": {"tp": ns.tp, "pp": ns.pp, "dp": parallel_state.get_data_parallel_world_size()},
        "layer_pairs": inputs.pairs,
        "ranks": inputs.ranks,
        "rollouts": prepared.rollouts,
        "supervised_rows": collected.supervised_rows,
        "rows": collected.rows,
        "positions": vars(inputs.positions),
        "alignment": prepared.alignment,
        "skipped_tokens": prepared.skipped,
        "student_map": inputs.fit.kind,
        "files": {str(r): p.name for r, p in paths.items()},
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    write_report(out / "report.json", summary, fits)
    print(format_report(fits))
    print(
        f"{prepared.rollouts} rollouts, {collected.rows} of {collected.supervised_rows} "
        f"supervised rows; wrote {', '.join(p.name for p in paths.values())} and report.json "
        f"to {out}"
    )


def run(ns: argparse.Namespace) -> int:
    """The whole build on this rank (checks first, then the process group); exit status."""
    from oprd_mega.parallel import ParallelLayout, destroy_distributed, init_distributed

    inputs = check_inputs(ns, int(os.environ.get("WORLD_SIZE", "1")))
    info = init_distributed(ParallelLayout(ns.tp, ns.pp), timeout_minutes=ns.timeout_minutes)
    try:
        timings: dict[str, float] = {}
        collected = collect(ns, inputs, info, timings)
        if collected.states is not None:
            finish(ns, inputs, collected, info.device, timings)
    finally:
        destroy_distributed()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``tools/build_bridge.py`` / ``oprd-build-bridge``: returns the exit status."""
    from oprd_mega.rollout.client import RolloutError
    from oprd_mega.rollout.servers import ServerLaunchError

    ns = build_parser().parse_args(argv)
    try:
        return run(ns)
    except RemoteError:
        return 2  # rank 0 prints the error
    except (BuildError, FileNotFoundError, ValueError, ServerLaunchError, RolloutError) as exc:
        if os.environ.get("RANK", "0") == "0":
            print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
