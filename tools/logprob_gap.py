#!/usr/bin/env python
"""Log-prob gap of students to their teacher on the teacher's greedy answers (docs/recovery.md).

For each held-out prompt (rendered with the teacher tokenizer's chat template by the trainer's
own ``load_prompts``) the teacher answers greedily (up to ``--max-new-tokens``, its EOS
included); every model then scores that answer, and the gap of a model is the mean over all
answer tokens of ``log p_teacher - log p_model`` (nats per token; 0 for the teacher itself).
It says how far a student is from the teacher where the teacher is sure, which held-out
accuracy alone does not: a student can fail every answer by a little or by a lot.

    python tools/logprob_gap.py --teacher DIR --prompts heldout.jsonl [--max-prompts N] \\
        NAME=MODEL_DIR ... [--json OUT]

Models must share the teacher's tokenizer. Float32, one sequence at a time, on the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from oprd_mega.data.prompts import load_prompts


def greedy_answers(
    model: PreTrainedModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos: int
) -> list[list[int]]:
    """The model's greedy answer token ids to each prompt, ending at its EOS (kept) or after
    ``max_new_tokens``."""
    answers = []
    for prompt in prompts:
        ids = torch.tensor([list(prompt)])
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                pad_token_id=eos,
            )  # fmt: skip
        answers.append(out[0, ids.shape[1] :].tolist())
    return answers


def answer_logprobs(
    model: PreTrainedModel, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]]
) -> list[torch.Tensor]:
    """Per answer token, ``log p(token | prompt, earlier answer tokens)`` under ``model``:
    one ``[answer tokens]`` float64 tensor per prompt."""
    scores = []
    for prompt, answer in zip(prompts, answers, strict=True):
        ids = torch.tensor([[*prompt, *answer]])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : -1].double()  # [answer, vocab]
        logp = torch.log_softmax(logits, dim=-1)
        scores.append(logp.gather(1, torch.tensor(answer)[:, None])[:, 0])
    return scores


def mean_gap(teacher: Sequence[torch.Tensor], model: Sequence[torch.Tensor]) -> float:
    """Mean of ``teacher - model`` over every answer token of every prompt."""
    return float(torch.cat([t - m for t, m in zip(teacher, model, strict=True)]).mean())


def load(path: str | Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="teacher HF directory")
    parser.add_argument("--prompts", required=True, help="prompt file (chat messages or text)")
    parser.add_argument("--prompt-key", default="prompt")
    parser.add_argument("--max-prompts", type=int, default=None, help="only the first N")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("models", nargs="+", metavar="NAME=DIR", help="models to score")
    args = parser.parse_args(argv)
    named = []
    for item in args.models:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            parser.error(f"models are NAME=DIR, got {item!r}")
        if not Path(path).is_dir():
            parser.error(f"{name}: {path} is not a directory")
        named.append((name, path))
    args.models = named
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    rows = load_prompts(args.prompts, tokenizer, prompt_key=args.prompt_key)
    prompts = [row.prompt_ids for row in rows[: args.max_prompts]]
    teacher = load(args.teacher)
    answers = greedy_answers(teacher, prompts, args.max_new_tokens, tokenizer.eos_token_id)
    reference = answer_logprobs(teacher, prompts, answers)
    tokens = sum(len(a) for a in answers)
    results = {
        "prompts": len(prompts),
        "answer_tokens": tokens,
        "teacher_mean_logprob": float(torch.cat(reference).mean()),
        "gap": {},
    }
    print(f"{len(prompts)} prompts, {tokens} teacher answer tokens")
    for name, path in args.models:
        gap = mean_gap(reference, answer_logprobs(load(path), prompts, answers))
        results["gap"][name] = gap
        print(f"{name}: log p_teacher - log p_{name} = {gap:.3f} nats per answer token")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
