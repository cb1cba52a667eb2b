"""Held-out evaluation: sample k responses per prompt, check each against the reference answer.

The trainer evaluates its live student through its own rollout servers; ``oprd-mega evaluate``
scores any model directory (a teacher, an exported student) the same way, so the numbers
printed next to each other come from one code path.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from typing import Any

from oprd_mega.cli_args import (
    existing_dir,
    existing_file,
    non_negative_float,
    port,
    positive_int,
)
from oprd_mega.data.prompts import Prompt
from oprd_mega.rollout.samples import Sample
from oprd_mega.train.verifiers import make_verifier, summarize


def score(
    prompts: Sequence[Prompt],
    groups: Sequence[Sequence[Sample]],
    tokenizer: Any,
    answer_key: str,
    verifier: str,
) -> dict[str, float]:
    """``eval/avg_at_k`` and friends for ``groups[i]``, the samples of ``prompts[i]``."""
    check = make_verifier(verifier)
    correct, lengths, finishes = [], [], []
    for prompt, group in zip(prompts, groups, strict=True):
        answer = prompt.extra[answer_key]
        texts = [tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in group]
        correct.append([check(text, answer) for text in texts])
        lengths.append([s.response_length for s in group])
        finishes.append([s.finish_reason for s in group])
    return summarize(correct, lengths, finishes).as_metrics()


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
        "--prompts", required=True, type=existing_file, help="JSONL/Parquet with prompt and answer"
    )
    parser.add_argument("--prompt-key", default="prompt")
    parser.add_argument("--answer-key", default="answer")
    parser.add_argument("--chat-template", action="store_true", help="render chat prompts")
    parser.add_argument(
        "--verifier", default="auto", choices=("auto", "exact", "boxed", "math-verify")
    )
    parser.add_argument("--k", type=positive_int, default=1, help="samples per prompt (Avg@k)")
    parser.add_argument("--temperature", type=non_negative_float, default=0.0)
    parser.add_argument("--max-new-tokens", type=positive_int, default=1024)
    parser.add_argument("--max-prompts", type=positive_int, default=None)
    parser.add_argument("--backend", default="embedded", choices=("embedded", "sglang", "auto"))
    parser.add_argument("--port", type=port, default=None, help="server port (default: a free one)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")


def run(args: argparse.Namespace) -> int:
    """Serve ``--model``, sample, score, print."""
    import json

    from transformers import AutoTokenizer

    from oprd_mega.data.prompts import load_prompts
    from oprd_mega.rollout.client import RolloutClient
    from oprd_mega.rollout.sampling import SamplingConfig, sample_groups
    from oprd_mega.rollout.servers import LaunchConfig, ServerGroup

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompts = load_prompts(
        args.prompts, tokenizer, prompt_key=args.prompt_key, chat_template=args.chat_template
    )[: args.max_prompts]
    missing = [p.index for p in prompts if args.answer_key not in p.extra]
    if missing:
        raise SystemExit(
            f"error: {args.prompts} row {missing[0]} has no column {args.answer_key!r}"
        )
    sampling = SamplingConfig(
        n=args.k,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        sampling_seed=args.seed,
    )
    launch = LaunchConfig(model_path=args.model, backend=args.backend, base_port=args.port)

    async def main(urls: list[str]) -> list[list[Sample]]:
        async with RolloutClient(urls) as client:
            return await sample_groups(client, [p.prompt_ids for p in prompts], sampling)

    with ServerGroup.launch(launch) as servers:
        groups = asyncio.run(main(servers.urls))
    metrics = score(prompts, groups, tokenizer, args.answer_key, args.verifier)
    if args.json:
        print(json.dumps(metrics))
    else:
        print(
            f"{args.model}: Avg@{args.k} {100 * metrics['eval/avg_at_k']:.1f}% on "
            f"{len(prompts)} prompts, mean response length {metrics['eval/response_length']:.1f}"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m oprd_mega.train.evaluation``."""
    return run(_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
