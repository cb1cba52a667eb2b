"""Held-out evaluation: sample k responses per prompt, check each against the reference answer.

The trainer evaluates its live student through its own rollout servers; ``oprd-mega evaluate``
scores any model directory (a teacher, an exported student) the same way, so the numbers
printed next to each other come from one code path. A run may have several named evaluation
sets (``evaluation.sets``), each with its own prompts, verifier, k and sampling.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from oprd_mega.cli_args import (
    existing_dir,
    existing_file,
    non_negative_float,
    port,
    positive_int,
)
from oprd_mega.config import TrainConfig
from oprd_mega.config.training import EvalSetSection
from oprd_mega.data.prompts import Prompt, PromptDataError, load_prompts
from oprd_mega.rollout.samples import Sample
from oprd_mega.rollout.sampling import SamplingConfig
from oprd_mega.train.logs import Progress, add_log_level_argument, logger, setup_logging
from oprd_mega.train.verifiers import make_verifier, pass_k_values, summarize


@dataclass(frozen=True)
class EvalSet:
    """One evaluation set of a run, resolved: ``name`` '' is the set of the top-level
    ``evaluation`` keys (metrics ``eval/...``), any other the set ``evaluation.sets.NAME``
    (metrics ``eval/NAME/...``)."""

    name: str
    prompts_path: str
    answer_key: str
    verifier: str
    k: int
    max_prompts: int | None
    sampling: SamplingConfig

    @property
    def key(self) -> str:
        """The config key of this set, for error messages."""
        return f"evaluation.sets.{self.name}" if self.name else "evaluation"

    @property
    def prefix(self) -> str:
        """The prefix of this set's metric names."""
        return f"eval/{self.name}/" if self.name else "eval/"

    @property
    def label(self) -> str:
        """How log lines name the set."""
        return self.name or "held-out"


def _resolve(name: str, section: EvalSetSection, rollout_sampling: SamplingConfig) -> EvalSet:
    assert section.prompts is not None
    sampling = section.sampling or dataclasses.replace(rollout_sampling, n=section.k)
    return EvalSet(
        name=name,
        prompts_path=section.prompts,
        answer_key=section.answer_key,
        verifier=section.verifier,
        k=section.k,
        max_prompts=section.max_prompts,
        sampling=sampling,
    )


def evaluation_sets(config: TrainConfig) -> list[EvalSet]:
    """Every evaluation set of ``config``: the top-level one (when it has prompts) first, then
    ``evaluation.sets`` in file order. Empty when evaluation is off."""
    evaluation = config.evaluation
    if evaluation.interval <= 0:
        return []
    sets = []
    if evaluation.prompts is not None:
        sets.append(_resolve("", evaluation, config.evaluation_sampling))
    for name, section in evaluation.sets.items():
        sets.append(_resolve(name, section, config.rollout.sampling))
    return sets


def check_answers(prompts: Sequence[Prompt], answer_key: str, where: str) -> None:
    """A :class:`PromptDataError` naming ``where`` (the file and its config key or flag) and
    the first row without the ``answer_key`` column."""
    missing = [p.index for p in prompts if answer_key not in p.extra]
    if missing:
        columns = sorted(prompts[missing[0]].extra)
        raise PromptDataError(
            f"{where}: row {missing[0]} has no answer column {answer_key!r} (columns besides "
            f"the prompt: {columns}); {len(missing)} of {len(prompts)} rows lack it"
        )


def load_eval_set(eval_set: EvalSet, tokenizer: Any, **rendering: Any) -> list[Prompt]:
    """The set's first ``max_prompts`` prompts, each checked to have a reference answer;
    ``rendering``: the ``load_prompts`` keywords of the training prompts (data section)."""
    where = f"{eval_set.key}.prompts = {eval_set.prompts_path!r}"
    try:
        prompts = load_prompts(eval_set.prompts_path, tokenizer, **rendering)
    except PromptDataError as exc:
        raise PromptDataError(f"{where}: {exc}") from exc
    check_answers(prompts, eval_set.answer_key, f"{where} ({eval_set.key}.answer_key)")
    return prompts[: eval_set.max_prompts]


def score(
    prompts: Sequence[Prompt],
    groups: Sequence[Sequence[Sample]],
    tokenizer: Any,
    answer_key: str,
    verifier: str,
    prefix: str = "eval/",
) -> dict[str, float]:
    """``{prefix}avg_at_k``, ``best_at_k``, ``pass_at_{j}`` and friends for ``groups[i]``, the
    samples of ``prompts[i]``."""
    check = make_verifier(verifier)
    correct, lengths, finishes = [], [], []
    for prompt, group in zip(prompts, groups, strict=True):
        answer = prompt.extra[answer_key]
        texts = [tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in group]
        correct.append([check(text, answer) for text in texts])
        lengths.append([s.response_length for s in group])
        finishes.append([s.finish_reason for s in group])
    return summarize(correct, lengths, finishes).as_metrics(prefix)


def describe_eval(eval_set: EvalSet, metrics: dict[str, float], label: str | None = None) -> str:
    """One line of a set's results in ``metrics``, e.g. ``held-out Avg@4 45.0%, Best@4 80.0%,
    pass@2 70.0% (500 prompts, mean response length 31.0)``; ``label`` replaces the set's."""
    prefix, k = eval_set.prefix, eval_set.k
    parts = [f"Avg@{k} {100 * metrics[prefix + 'avg_at_k']:.1f}%"]
    if k > 1:
        parts.append(f"Best@{k} {100 * metrics[prefix + 'best_at_k']:.1f}%")
        parts += [
            f"pass@{j} {100 * metrics[f'{prefix}pass_at_{j}']:.1f}%"
            for j in pass_k_values(k)
            if 1 < j < k
        ]
    prompts, length = metrics[prefix + "num_prompts"], metrics[prefix + "response_length"]
    return (
        f"{label or eval_set.label} {', '.join(parts)} ({prompts:.0f} prompts, "
        f"mean response length {length:.1f})"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oprd-mega evaluate",
        description="Avg@k of a Hugging Face model directory on held-out prompts, served by the "
        "embedded server (or SGLang with --backend sglang), scored like the trainer's evaluation.",
    )
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The evaluate subcommand's arguments."""
    parser.add_argument(
        "--model", required=True, type=existing_dir, help="Hugging Face model directory"
    )
    parser.add_argument(
        "--prompts",
        required=True,
        type=existing_file,
        help="JSONL/Parquet prompt file with a prompt and a reference answer column "
        "(tools/prepare_eval.py makes one from AIME/MATH-style files)",
    )
    parser.add_argument(
        "--prompt-key", default="prompt", help="column holding the prompt (default: prompt)"
    )
    parser.add_argument(
        "--answer-key",
        default="answer",
        help="column holding the reference answer (default: answer)",
    )
    parser.add_argument(
        "--chat-template",
        action="store_true",
        help="render prompts with the tokenizer's chat template (default: raw text)",
    )
    parser.add_argument(
        "--verifier",
        default="auto",
        choices=("auto", "exact", "boxed", "math-verify"),
        help="answer check: exact final answer, last \\boxed{}, math-verify, or auto "
        "(math-verify when installed, else boxed then exact); default auto",
    )
    parser.add_argument(
        "--k",
        type=positive_int,
        default=1,
        help="samples per prompt: Avg@k, Best@k, pass@j (default 1)",
    )
    parser.add_argument(
        "--temperature",
        type=non_negative_float,
        default=0.0,
        help="sampling temperature; 0 is greedy",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=1024,
        help="most tokens per response (default 1024)",
    )
    parser.add_argument(
        "--max-prompts", type=positive_int, default=None, help="score only the first N prompts"
    )
    parser.add_argument(
        "--backend",
        default="embedded",
        choices=("embedded", "sglang", "auto"),
        help="rollout server to launch: embedded (CPU, transformers), sglang, or auto",
    )
    parser.add_argument(
        "--port", type=port, default=None, help="port of the launched server (default: a free one)"
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    add_log_level_argument(parser)


def run(args: argparse.Namespace) -> int:
    """Serve ``--model``, sample, score, print."""
    import json

    from transformers import AutoTokenizer

    from oprd_mega.rollout.client import RolloutClient
    from oprd_mega.rollout.sampling import sample_groups
    from oprd_mega.rollout.servers import LaunchConfig, PortTakenError, ServerGroup

    # Logs on standard error: standard output holds the result (--json is read by scripts).
    setup_logging(getattr(args, "log_level", "INFO"), stream=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    try:
        prompts = load_prompts(
            args.prompts, tokenizer, prompt_key=args.prompt_key, chat_template=args.chat_template
        )[: args.max_prompts]
        check_answers(prompts, args.answer_key, f"--prompts {args.prompts} (--answer-key)")
    except PromptDataError as exc:
        raise SystemExit(f"error: {exc}") from exc
    sampling = SamplingConfig(
        n=args.k,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        sampling_seed=args.seed,
    )
    launch = LaunchConfig(model_path=args.model, backend=args.backend, base_port=args.port)

    async def main(urls: list[str]) -> list[list[Sample]]:
        async with RolloutClient(urls) as client:
            ids = [p.prompt_ids for p in prompts]
            return await sample_groups(client, ids, sampling, on_prompt_done=progress.update)

    try:
        servers = ServerGroup.launch(launch)
    except PortTakenError as exc:
        print(
            f"oprd-mega evaluate: error: {exc.naming('--port', 'or leave it out')}", file=sys.stderr
        )
        return 2
    with servers:
        logger.info(f"evaluating {args.model} on {len(prompts)} prompts x {args.k} samples")
        with Progress(len(prompts), "evaluation", "prompt") as progress:
            groups = asyncio.run(main(servers.urls))
    metrics = score(prompts, groups, tokenizer, args.answer_key, args.verifier)
    if args.json:
        print(json.dumps(metrics))
    else:
        eval_set = EvalSet(
            "", args.prompts, args.answer_key, args.verifier, args.k, args.max_prompts, sampling
        )
        print(describe_eval(eval_set, metrics, label=f"{args.model}:"))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m oprd_mega.train.evaluation``."""
    return run(_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
