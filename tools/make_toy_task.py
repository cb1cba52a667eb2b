#!/usr/bin/env python
"""Build the toy task of the CPU quickstart: a teacher, a student and prompt files.

The task: 2-digit addition with zero-padded operands and the sum reversed, zero-padded to 3
digits ("07+45=" -> "250"). One seeded SFT run of a tiny Llama (4 layers, hidden 128) trains on
the problems that are not held out; its checkpoint at ``--student-steps`` is the (weak) student
and the one at ``--teacher-steps`` the (strong) teacher, so the pair shares a lineage like the
paper's.

With the defaults (seed 0) the student, at step 200, gets 12.4% of the 500 held-out problems
right (greedy) and the teacher, at step 1600, 99.8%. The student's accuracy climbs steeply around
its step (seed 0: 5.4% at step 175, 24% at 225, 79% at 450) and the climb starts later or
earlier with other seeds (seed 1: 1.6% at 200, 13% at 250), so with another ``--seed`` check the
printed accuracies (also in ``models/accuracy.json``) and move ``--student-steps`` if needed.

With ``--narrow`` it also builds a narrower student for the ``full`` projection example
(examples/tiny_cpu_narrow_full.yaml): a separate seeded SFT run of the same recipe on the same
training problems, of a Llama with hidden ``--narrow-hidden`` (default 64; 4 heads, MLP 4x
hidden), stopped at ``--narrow-steps``. With the defaults (seed 0, hidden 64, step 300) it gets
8.4% of the held-out problems right (greedy). Its curve (seed 0): 5.0% at step 200, 10% at 250,
16% at 325, 26% at 400, 89% at 500, 99% at 700, so it can learn the task; as with the student,
check the printed accuracy with another ``--seed``. The default build does not pay for it: it
has its own manifest, written after the default build is complete (reused if there).

With ``--second-task`` it also builds a second task over the same tokenizer, for the
several-teacher demonstration (docs/multi-teacher.md, scripts/two_teachers.sh): ``fwd``, the
same sums in the usual order after ``==`` ("07+45==" -> "052"), on the same training and
held-out operand pairs, and its teacher ``models/teacher_fwd``: SFT of the same recipe on the
second task's training problems only, starting from the student's weights (``--second-steps``,
default 1000), so the student and both teachers share a lineage. ``data/multi_train.jsonl``
holds both tasks' training problems, alternating, with a ``task`` column (``add`` or ``fwd``).
Every model's greedy accuracy on both tasks goes to ``models/accuracy.json`` (``two_tasks``).
With the defaults (seed 0) ``teacher_fwd`` gets 94.0% of the 500 held-out ``fwd`` problems right
and 2.6% of the ``add`` ones (it forgot the reversed order), the student 0.4% of ``fwd``, the
quickstart's teacher 0.4% of ``fwd``; the curve of ``teacher_fwd`` (seed 0, on a shared 2-core
machine): 28.6% at step 250, 88.6% at 500, 85.0% at 750, 94.0% at 1000 (886 s there, on two
cores loaded by other work; the 1,600 steps of the default build take about 4.5 minutes idle).
Like ``--narrow`` it has its own manifest, written after the default build is complete.

Layout of ``--out`` (default ``runs/quickstart``)::

    models/teacher/         config.json, model.safetensors (fp32), generation_config.json,
    models/student/         tokenizer.json, tokenizer_config.json
    models/student_narrow/  (with --narrow) the same files
    models/teacher_fwd/     (with --second-task) the same files
    models/accuracy.json    greedy exact-match accuracy of each on the held-out problems
    data/train.jsonl        {"prompt": "07+45=", "answer": "250"} per line: every training problem
    data/heldout.jsonl      the held-out problems (same fields)
    manifest.json           the options of the build; written last, so it marks a complete build
    manifest_narrow.json    (with --narrow) the same for the narrow student, written after it
    data/fwd_train.jsonl    (with --second-task) the second task's problems, same fields
    data/fwd_heldout.jsonl
    data/multi_train.jsonl  (with --second-task) both tasks, {"prompt", "answer", "task"}
    manifest_second.json    (with --second-task) the same for the second task, written after it

A re-run with the same options finds the manifests and exits at once; ``--force`` rebuilds
(everything). Each model directory is written into a temporary directory and renamed into place.

The tokenizer is character-level: the 10 digits, '+', '=', then ``<s>``, ``</s>``, ``<pad>`` and
``<unk>`` (ids 0-9 are the digits; ``<unk>`` is the unused 16th token that makes the vocabulary
even, so tensor parallel 2 splits it without padding). ``encode(prompt)`` prepends ``<s>``.

Run: ``python tools/make_toy_task.py [--out DIR] [--seed N] [--narrow] [--force]`` (about 5
minutes on two idle CPU cores with the defaults; ``--narrow`` adds about a minute).

With ``--chat-task first-word`` it builds no models, only the prompt files of a task for a real
chat model (the recovery run, docs/recovery.md): "Which word comes first in this list: W1, W2,
W3?" over three different words of :data:`WORDS`, answered with W1, as chat messages with one
worked example before the question (the prompt files' ``prompt`` column holds the messages;
training renders them with the model's chat template). ``--train-prompts`` (default 2000) and
``--heldout`` (default 200 here) distinct word lists are drawn with the seed; the held-out ones
come first and no list is in both files. ``data/train.jsonl`` and ``data/heldout.jsonl`` are
rewritten on every run (the draw is deterministic).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

DIGITS = "0123456789"
CHARACTERS = [*DIGITS, "+", "="]
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = [BOS, EOS, PAD, UNK]
VOCAB: dict[str, int] = {token: i for i, token in enumerate(CHARACTERS + SPECIAL_TOKENS)}
VOCAB_SIZE = len(VOCAB)  # 16: 15 used tokens and <unk>
ANSWER_LENGTH = 3
PROMPT_LENGTH = 6  # "07+45="
NUM_PROBLEMS = 100 * 100
MANIFEST = "manifest.json"
NARROW_MANIFEST = "manifest_narrow.json"
MANIFEST_FORMAT = 1
NARROW_NAME = "student_narrow"
SECOND_MANIFEST = "manifest_second.json"
SECOND_NAME = "teacher_fwd"  # the second task's teacher
SECOND_PROMPT_LENGTH = 7  # "07+45=="
TASKS = ("add", "fwd")  # the task column of data/multi_train.jsonl
HIDDEN = 128  # the teacher's and the default student's width
NUM_HEADS = 4
MODEL_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json")


CHAT_TASKS = ("first-word",)
CHAT_HELDOUT = 200
CHAT_TRAIN = 2000
# 201 common English nouns, each one or two SmolLM2 tokens: the words of the first-word task.
_WORD_TEXT = """
    apple arm baby bag ball bank bed bell bird boat body bone book boot bottle box boy bread
    bridge brother brush bucket cake camera car card cat chain chair cheese chicken child church
    city clock cloud coat coffee coin corn cow cup desk dog doll door dress drum duck ear earth
    egg engine eye face farm father feather field finger fire fish flag floor flower foot forest
    fork friend frog game garden gate girl glass glove goat gold grass hair hammer hand hat head
    heart hill horse house ice island jacket jam key king kitten knife lake lamp leaf leg lemon
    letter lion lip lock map market milk money monkey moon mother mountain mouse mouth nail neck
    needle nest night nose ocean orange owl paint paper park pen pencil piano pig pillow pipe
    plane plant plate pocket potato queen rabbit rain ring river road rock roof room rope rose
    salt sand school sea seed sheep shelf ship shirt shoe sister sky snake snow sock song spoon
    star stone street sugar sun table tail tea teeth ticket tiger toe tomato tooth town toy train
    tree truck umbrella uncle violin wall watch water whale wheel window wing winter wolf wood
    world yard zebra
"""
WORDS: tuple[str, ...] = tuple(_WORD_TEXT.split())
FIRST_WORD_EXAMPLE = ("sun", "cat", "box")  # the worked example before every question


@dataclass(frozen=True)
class Options:
    """Everything that determines the build's results (the manifest stores these)."""

    seed: int = 0
    student_steps: int = 200
    teacher_steps: int = 1600
    heldout: int = 500
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 100
    grad_clip: float = 1.0


@dataclass(frozen=True)
class NarrowOptions:
    """The narrow student's own options (the rest of its recipe is :class:`Options`')."""

    hidden: int = 64
    steps: int = 300


@dataclass(frozen=True)
class SecondOptions:
    """The second task's teacher: SFT steps on the second task, from the student's weights (the
    rest of its recipe is :class:`Options`')."""

    steps: int = 1000


# ----------------------------------------------------------------------------- task and data


def problem(a: int, b: int) -> tuple[str, str]:
    """The prompt and answer for ``a + b``: ``problem(7, 45) == ("07+45=", "250")``."""
    if not (0 <= a <= 99 and 0 <= b <= 99):
        raise ValueError(f"operands must be in 0..99, got {a} and {b}")
    return f"{a:02d}+{b:02d}=", f"{a + b:03d}"[::-1]


def all_pairs() -> list[tuple[int, int]]:
    """Every operand pair, in order: (0, 0), (0, 1), ..., (99, 99)."""
    return [(a, b) for a in range(100) for b in range(100)]


def split_problems(
    seed: int, heldout: int = 500
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Split all 10,000 operand pairs into (train, held-out), each sorted; ``heldout`` pairs are
    drawn at random (Python's ``random`` seeded with ``seed``, stable across versions)."""
    if not 0 < heldout < NUM_PROBLEMS:
        raise ValueError(f"heldout must be in 1..{NUM_PROBLEMS - 1}, got {heldout}")
    pairs = all_pairs()
    chosen = set(random.Random(seed).sample(range(NUM_PROBLEMS), heldout))
    train = [pair for i, pair in enumerate(pairs) if i not in chosen]
    held = [pair for i, pair in enumerate(pairs) if i in chosen]
    return train, held


def problem_records(pairs: Sequence[tuple[int, int]]) -> list[dict[str, str]]:
    """``{"prompt": ..., "answer": ...}`` for each pair (the trainer's prompt-file format)."""
    records = []
    for a, b in pairs:
        prompt, answer = problem(a, b)
        records.append({"prompt": prompt, "answer": answer})
    return records


def fwd_problem(a: int, b: int) -> tuple[str, str]:
    """The second task's prompt and answer for ``a + b``: the sum in the usual order,
    zero-padded to 3 digits, after ``==``: ``fwd_problem(7, 45) == ("07+45==", "052")``."""
    prompt, answer = problem(a, b)
    return prompt + "=", answer[::-1]


def fwd_records(pairs: Sequence[tuple[int, int]]) -> list[dict[str, str]]:
    """``{"prompt": ..., "answer": ...}`` of the second task for each pair."""
    records = []
    for a, b in pairs:
        prompt, answer = fwd_problem(a, b)
        records.append({"prompt": prompt, "answer": answer})
    return records


def first_word_question(words: Sequence[str]) -> str:
    """The question of the first-word task: ``"Which word comes first in this list: a, b, c?"``."""
    return f"Which word comes first in this list: {', '.join(words)}?"


def first_word_records(seed: int, count: int) -> list[dict[str, Any]]:
    """``count`` first-word problems, ``{"prompt": messages, "answer": first word}``: distinct
    lists of three different words of :data:`WORDS` drawn with ``random.Random(seed)`` (a list
    drawn again is skipped), each asked after one worked example (``FIRST_WORD_EXAMPLE``)."""
    if count < 1:
        raise ValueError(f"count must be positive, got {count}")
    rng = random.Random(seed)
    example = [
        {"role": "user", "content": first_word_question(FIRST_WORD_EXAMPLE)},
        {"role": "assistant", "content": FIRST_WORD_EXAMPLE[0]},
    ]
    seen: set[tuple[str, ...]] = set()
    records: list[dict[str, Any]] = []
    while len(records) < count:
        words = tuple(rng.sample(WORDS, 3))
        if words in seen:
            continue
        seen.add(words)
        question = {"role": "user", "content": first_word_question(words)}
        records.append({"prompt": [*example, question], "answer": words[0]})
    return records


def build_chat_task(out: Path, task: str, seed: int, heldout: int, train: int) -> None:
    """Write ``out/data/heldout.jsonl`` (the first ``heldout`` problems) and
    ``out/data/train.jsonl`` (the next ``train``) of chat task ``task``."""
    if task not in CHAT_TASKS:
        raise ValueError(f"unknown chat task {task!r} (known: {', '.join(CHAT_TASKS)})")
    if heldout < 1 or train < 1:
        raise ValueError(f"heldout and train must be positive, got {heldout} and {train}")
    records = first_word_records(seed, heldout + train)
    write_jsonl(out / "data" / "heldout.jsonl", records[:heldout])
    write_jsonl(out / "data" / "train.jsonl", records[heldout:])


def write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Write one JSON object per line, atomically (a temporary file renamed into place)."""
    text = "".join(json.dumps(record) + "\n" for record in records)
    _write_text_atomic(path, text)


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- tokenizer


def make_char_tokenizer() -> PreTrainedTokenizerFast:
    """The character-level tokenizer: one token per character, ``<s>`` prepended by
    ``encode(..., add_special_tokens=True)``, decoding joins characters without spaces."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, VOCAB[BOS])]
    )
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=64,
    )


def encode_examples(records: Sequence[dict[str, str]]) -> torch.Tensor:
    """Token ids of ``<s> prompt answer </s>`` for each record, shape ``[n, 11]``.

    Characters map straight to :data:`VOCAB` (the same ids the tokenizer gives, which the tests
    check), so encoding 10,000 problems takes no tokenizer calls."""
    import torch

    rows = [
        [VOCAB[BOS], *(VOCAB[c] for c in r["prompt"] + r["answer"]), VOCAB[EOS]] for r in records
    ]
    return torch.tensor(rows, dtype=torch.long)


# ----------------------------------------------------------------------------- model


def make_model(seed: int, hidden: int = HIDDEN) -> LlamaForCausalLM:
    """A freshly initialised fp32 Llama (4 layers, ``hidden`` wide, 4 heads, MLP 4 x hidden;
    the default: hidden 128, MLP 512), seeded."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if hidden % (2 * NUM_HEADS):
        raise ValueError(
            f"hidden must be a multiple of {2 * NUM_HEADS} (even head_dim), got {hidden}"
        )
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=4,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_HEADS,
        max_position_embeddings=64,
        hidden_act="silu",
        tie_word_embeddings=False,
        bos_token_id=VOCAB[BOS],
        eos_token_id=VOCAB[EOS],
        pad_token_id=VOCAB[PAD],
    )
    config.dtype = torch.float32
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=VOCAB[BOS], eos_token_id=VOCAB[EOS], pad_token_id=VOCAB[PAD]
    )
    return model


def save_model_dir(model: LlamaForCausalLM, path: Path) -> None:
    """Save weights (safetensors, fp32), configs and tokenizer to ``path`` atomically: into a
    temporary sibling directory, then renamed over any previous ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; a model directory is for reading
        model.save_pretrained(tmp, safe_serialization=True)
        make_char_tokenizer().save_pretrained(tmp)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an existing ``target`` is moved aside first, then deleted."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}-old-{os.getpid()}")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- training


def answer_loss(
    model: LlamaForCausalLM, batch: torch.Tensor, prompt_length: int = PROMPT_LENGTH
) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens and the ``</s>`` after them (the prompt and
    ``<s>`` carry no loss). ``batch`` is ``[n, 2 + prompt_length + 3]`` from
    :func:`encode_examples` (``[n, 11]`` for the quickstart's task)."""
    import torch.nn.functional as F

    logits = model(input_ids=batch[:, :-1]).logits
    # Position t predicts token t + 1; the answer starts at token 1 + prompt_length.
    first = prompt_length  # the position that predicts the first answer token
    target = batch[:, first + 1 :]
    pred = logits[:, first:, :]
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]).float(), target.reshape(-1))


def batches(examples: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless shuffled epochs over ``examples`` in batches of ``batch_size`` (seeded)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(examples), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield examples[order[start : start + batch_size]]


def train(
    model: LlamaForCausalLM,
    examples: torch.Tensor,
    options: Options,
    checkpoints: dict[int, Callable[[LlamaForCausalLM], None]],
    log_every: int = 100,
    steps: int | None = None,
    prompt_length: int = PROMPT_LENGTH,
) -> None:
    """SFT: AdamW, linear warm-up to ``options.lr`` then constant, gradient clipping, for
    ``steps`` steps (default ``options.teacher_steps``) on prompts of ``prompt_length``
    characters. After step ``s`` (counting from 1) ``checkpoints[s](model)`` runs, if present."""
    import torch

    steps = options.teacher_steps if steps is None else steps

    if options.batch_size > len(examples):
        raise ValueError(f"batch size {options.batch_size} > {len(examples)} training problems")
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr)
    warmup = max(options.warmup_steps, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup)
    )
    model.train()
    stream = batches(examples, options.batch_size, options.seed)
    start = time.monotonic()
    for step in range(1, steps + 1):
        loss = answer_loss(model, next(stream), prompt_length)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps:
            elapsed = time.monotonic() - start
            print(f"step {step:5d}  loss {loss.item():.4f}  {elapsed:6.1f} s", flush=True)
        if step in checkpoints:
            checkpoints[step](model)


# ----------------------------------------------------------------------------- evaluation


def greedy_answers(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    prompts: Sequence[str],
    batch_size: int = 500,
) -> list[str]:
    """Decode ``ANSWER_LENGTH`` tokens greedily after each prompt; return the decoded answers
    (special tokens skipped, stripped)."""
    import torch

    was_training = model.training
    model.eval()
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        # All prompts have the same length, so the batch needs no padding.
        ids = torch.tensor([tokenizer.encode(p, add_special_tokens=True) for p in chunk])
        with torch.no_grad():
            for _ in range(ANSWER_LENGTH):
                next_token = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, next_token], dim=1)
        new = ids[:, -ANSWER_LENGTH:].tolist()
        answers.extend(tokenizer.decode(row, skip_special_tokens=True).strip() for row in new)
    model.train(was_training)
    return answers


def accuracy(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, records: Sequence[dict[str, str]]
) -> float:
    """Greedy exact-match accuracy of ``model`` on ``records``."""
    answers = greedy_answers(model, tokenizer, [r["prompt"] for r in records])
    return sum(a == r["answer"] for a, r in zip(answers, records, strict=True)) / len(records)


def saved_accuracy(model_dir: Path, records: Sequence[dict[str, str]]) -> float:
    """Load ``model_dir`` (model and tokenizer) with transformers' Auto classes and measure its
    greedy exact-match accuracy on ``records``: this checks the saved files, not the memory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return accuracy(model, tokenizer, records)


# ----------------------------------------------------------------------------- build


def read_manifest(out: Path) -> dict[str, Any] | None:
    """The manifest of a complete build in ``out``, or None (missing, unreadable, or files of
    the build missing)."""
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    needed = [out / "models" / name / f for name in ("student", "teacher") for f in MODEL_FILES]
    needed += [out / "models" / "accuracy.json", out / "data/train.jsonl"]
    needed += [out / "data/heldout.jsonl"]
    if not isinstance(manifest, dict) or not all(p.is_file() for p in needed):
        return None
    return manifest


def is_complete(out: Path, options: Options) -> bool:
    """Whether ``out`` holds a complete build made with ``options``."""
    manifest = read_manifest(out)
    return (
        manifest is not None
        and manifest.get("format") == MANIFEST_FORMAT
        and manifest.get("options") == asdict(options)
    )


def build_environment() -> dict[str, Any]:
    """What decides the SFT's float rounding on this machine: torch, its CPU kernel set, threads."""
    import torch

    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }


def build(out: Path, options: Options) -> dict[str, float]:
    """Write data, both models and their accuracies to ``out``; return the accuracies."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the saves and loads here take milliseconds
    (out / MANIFEST).unlink(missing_ok=True)  # an interrupted rebuild must not look complete
    (out / NARROW_MANIFEST).unlink(missing_ok=True)  # accuracy.json is rewritten without it
    (out / SECOND_MANIFEST).unlink(missing_ok=True)  # the same for the second task
    train_pairs, held_pairs = split_problems(options.seed, options.heldout)
    train_records, held_records = problem_records(train_pairs), problem_records(held_pairs)
    write_jsonl(out / "data" / "train.jsonl", train_records)
    write_jsonl(out / "data" / "heldout.jsonl", held_records)
    print(f"data: {len(train_records)} training, {len(held_records)} held-out problems")

    models = out / "models"
    checkpoints: dict[int, Callable[[LlamaForCausalLM], None]] = {
        options.student_steps: lambda m: save_model_dir(m, models / "student")
    }
    start = time.monotonic()
    model = make_model(options.seed)
    train(model, encode_examples(train_records), options, checkpoints)
    save_model_dir(model, models / "teacher")
    built_with = build_environment()
    print(
        f"SFT: {options.teacher_steps} steps in {time.monotonic() - start:.1f} s (torch "
        f"{built_with['torch']}, CPU kernels {built_with['cpu_capability']}, "
        f"{built_with['threads']} thread(s))"
    )

    scores = {name: saved_accuracy(models / name, held_records) for name in ("student", "teacher")}
    report = {
        "metric": "greedy exact match on data/heldout.jsonl",
        "num_problems": len(held_records),
        "student": {"steps": options.student_steps, "accuracy": scores["student"]},
        "teacher": {"steps": options.teacher_steps, "accuracy": scores["teacher"]},
        # The float path of the SFT: other CPU kernels (AVX-512 vs AVX2) or thread counts
        # round differently, and the weak student's accuracy moves by a few points.
        "built_with": built_with,
    }
    _write_text_atomic(models / "accuracy.json", json.dumps(report, indent=2) + "\n")
    manifest = {"format": MANIFEST_FORMAT, "options": asdict(options), "accuracy": scores}
    _write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return scores


def _read_addon_manifest(
    out: Path, manifest_name: str, files: list[Path], report_key: str
) -> dict[str, Any] | None:
    """An add-on build's manifest ``manifest_name``, or None (missing, unreadable, one of
    ``files`` missing, or ``report_key`` missing from ``models/accuracy.json``)."""
    try:
        manifest = json.loads((out / manifest_name).read_text(encoding="utf-8"))
        report = json.loads((out / "models" / "accuracy.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(manifest, dict) or not isinstance(report, dict) or report_key not in report:
        return None
    return manifest if all(p.is_file() for p in files) else None


def _addon_complete(
    out: Path, options: Options, manifest: dict[str, Any] | None, key: str, addon: Any
) -> bool:
    """Whether ``out`` holds a complete default build made with ``options`` and an add-on whose
    ``manifest`` records ``options`` and its own options ``addon`` under ``key``."""
    return (
        is_complete(out, options)
        and manifest is not None
        and manifest.get("format") == MANIFEST_FORMAT
        and manifest.get("options") == asdict(options)
        and manifest.get(key) == asdict(addon)
    )


def read_narrow_manifest(out: Path) -> dict[str, Any] | None:
    """The narrow student's manifest, or None (missing, unreadable, its model files missing, or
    its accuracy missing from ``models/accuracy.json``)."""
    files = [out / "models" / NARROW_NAME / f for f in MODEL_FILES]
    return _read_addon_manifest(out, NARROW_MANIFEST, files, NARROW_NAME)


def is_narrow_complete(out: Path, options: Options, narrow: NarrowOptions) -> bool:
    """Whether ``out`` holds a complete default build made with ``options`` and a narrow student
    made with ``options`` and ``narrow``."""
    return _addon_complete(out, options, read_narrow_manifest(out), "narrow", narrow)


def build_narrow(out: Path, options: Options, narrow: NarrowOptions) -> float:
    """Train the narrow student (its own seeded SFT run, ``options``' recipe, on the training
    problems of the complete default build in ``out``), save it to ``models/student_narrow``,
    add its accuracy to ``models/accuracy.json``; return the accuracy."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    (out / NARROW_MANIFEST).unlink(missing_ok=True)
    train_pairs, held_pairs = split_problems(options.seed, options.heldout)
    train_records, held_records = problem_records(train_pairs), problem_records(held_pairs)
    path = out / "models" / NARROW_NAME
    start = time.monotonic()
    model = make_model(options.seed, hidden=narrow.hidden)
    train(model, encode_examples(train_records), options, {}, steps=narrow.steps)
    save_model_dir(model, path)
    print(f"narrow SFT (hidden {narrow.hidden}): {narrow.steps} steps in ", end="")
    print(f"{time.monotonic() - start:.1f} s")

    score = saved_accuracy(path, held_records)
    report_path = out / "models" / "accuracy.json"
    report = json.loads(report_path.read_text(encoding="utf-8"))
    report[NARROW_NAME] = {"steps": narrow.steps, "hidden": narrow.hidden, "accuracy": score}
    _write_text_atomic(report_path, json.dumps(report, indent=2) + "\n")
    manifest = {
        "format": MANIFEST_FORMAT,
        "options": asdict(options),
        "narrow": asdict(narrow),
        "accuracy": {NARROW_NAME: score},
    }
    _write_text_atomic(out / NARROW_MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return score


def read_second_manifest(out: Path) -> dict[str, Any] | None:
    """The second task's manifest, or None (missing, unreadable, its files missing, or its
    accuracies missing from ``models/accuracy.json``)."""
    files = [out / "models" / SECOND_NAME / f for f in MODEL_FILES]
    files += [out / "data" / name for name in ("multi_train.jsonl", "fwd_heldout.jsonl")]
    return _read_addon_manifest(out, SECOND_MANIFEST, files, "two_tasks")


def is_second_complete(out: Path, options: Options, second: SecondOptions) -> bool:
    """Whether ``out`` holds a complete default build made with ``options`` and the second task
    made with ``options`` and ``second``."""
    return _addon_complete(out, options, read_second_manifest(out), "second", second)


def build_second(out: Path, options: Options, second: SecondOptions) -> dict[str, dict[str, float]]:
    """The second task on the complete default build in ``out``: its data (``data/fwd_*``, the
    mixed ``data/multi_train.jsonl``), its teacher (SFT from ``models/student``'s weights on the
    second task's training problems, ``options``' recipe, ``second.steps`` steps) in
    ``models/teacher_fwd``, and every model's accuracy on both tasks' held-out problems (added to
    ``models/accuracy.json`` as ``two_tasks``); return those accuracies."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    (out / SECOND_MANIFEST).unlink(missing_ok=True)
    train_pairs, held_pairs = split_problems(options.seed, options.heldout)
    add_train, add_held = problem_records(train_pairs), problem_records(held_pairs)
    fwd_train, fwd_held = fwd_records(train_pairs), fwd_records(held_pairs)
    data = out / "data"
    write_jsonl(data / "fwd_train.jsonl", fwd_train)
    write_jsonl(data / "fwd_heldout.jsonl", fwd_held)
    # Both tasks' training problems, alternating, each with its task (the routing column).
    mixed = [
        {**record, "task": task}
        for pair in zip(add_train, fwd_train, strict=True)
        for task, record in zip(TASKS, pair, strict=True)
    ]
    write_jsonl(data / "multi_train.jsonl", mixed)
    print(f"second task: {len(fwd_train)} training, {len(fwd_held)} held-out problems; ", end="")
    print(f"{len(mixed)} mixed training prompts")

    path = out / "models" / SECOND_NAME
    model = AutoModelForCausalLM.from_pretrained(out / "models" / "student", dtype=torch.float32)
    tokenizer = make_char_tokenizer()

    def report_progress(m: LlamaForCausalLM) -> None:
        print(f"  held-out {TASKS[1]} accuracy {accuracy(m, tokenizer, fwd_held):.1%}", flush=True)

    every = max(second.steps // 4, 1)
    progress = {step: report_progress for step in range(every, second.steps + 1, every)}
    start = time.monotonic()
    train(
        model,
        encode_examples(fwd_train),
        options,
        progress,
        steps=second.steps,
        prompt_length=SECOND_PROMPT_LENGTH,
    )
    save_model_dir(model, path)
    print(f"second-task SFT: {second.steps} steps in {time.monotonic() - start:.1f} s")

    held = {TASKS[0]: add_held, TASKS[1]: fwd_held}
    scores = {
        name: {task: saved_accuracy(out / "models" / name, held[task]) for task in TASKS}
        for name in ("student", "teacher", SECOND_NAME)
    }
    report_path = out / "models" / "accuracy.json"
    report = json.loads(report_path.read_text(encoding="utf-8"))
    report["two_tasks"] = {
        "metric": "greedy exact match per task",
        "heldout": {TASKS[0]: "data/heldout.jsonl", TASKS[1]: "data/fwd_heldout.jsonl"},
        "steps": {
            "student": options.student_steps,
            "teacher": options.teacher_steps,
            SECOND_NAME: f"{options.student_steps} + {second.steps} on {TASKS[1]}",
        },
        "accuracy": scores,
    }
    _write_text_atomic(report_path, json.dumps(report, indent=2) + "\n")
    manifest = {
        "format": MANIFEST_FORMAT,
        "options": asdict(options),
        "second": asdict(second),
        "accuracy": scores,
    }
    _write_text_atomic(out / SECOND_MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return scores


def parse_args(
    argv: Sequence[str] | None = None,
) -> tuple[Path, Options, NarrowOptions | None, bool, argparse.Namespace]:
    """The output directory, the build options, the narrow student's options (None without
    ``--narrow``), ``--force`` and the parsed arguments (for ``--chat-task``)."""
    defaults = Options()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--student-steps", type=int, default=defaults.student_steps, help="SFT step of the student"
    )
    parser.add_argument(
        "--teacher-steps", type=int, default=defaults.teacher_steps, help="SFT step of the teacher"
    )
    parser.add_argument(
        "--heldout",
        type=int,
        default=None,
        help=f"held-out problems (default {defaults.heldout}; {CHAT_HELDOUT} with --chat-task)",
    )
    parser.add_argument(
        "--chat-task",
        choices=CHAT_TASKS,
        default=None,
        help="write only the prompt files of this task for a real chat model (no models)",
    )
    parser.add_argument(
        "--train-prompts",
        type=int,
        default=CHAT_TRAIN,
        help=f"training problems of --chat-task (default {CHAT_TRAIN})",
    )
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--grad-clip", type=float, default=defaults.grad_clip)
    parser.add_argument("--narrow", action="store_true", help=f"also build models/{NARROW_NAME}")
    parser.add_argument(
        "--narrow-hidden",
        type=int,
        default=None,
        help=f"hidden size of the narrow student (default {NarrowOptions.hidden})",
    )
    parser.add_argument(
        "--narrow-steps",
        type=int,
        default=None,
        help=f"SFT steps of the narrow student (default {NarrowOptions.steps})",
    )
    parser.add_argument(
        "--second-task",
        action="store_true",
        help=f"also build the second task ({TASKS[1]}) and models/{SECOND_NAME}",
    )
    parser.add_argument(
        "--second-steps",
        type=int,
        default=None,
        help=f"SFT steps of models/{SECOND_NAME} from the student (default {SecondOptions.steps})",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if complete")
    args = parser.parse_args(argv)
    if not 1 <= args.student_steps <= args.teacher_steps:
        parser.error("need 1 <= --student-steps <= --teacher-steps")
    if args.batch_size < 1:
        parser.error("--batch-size must be positive")
    if args.second_steps is not None and not args.second_task:
        parser.error("--second-steps needs --second-task")
    if args.second_steps is not None and args.second_steps < 1:
        parser.error("--second-steps must be positive")
    if args.heldout is None:
        args.heldout = CHAT_HELDOUT if args.chat_task else defaults.heldout
    options = Options(
        seed=args.seed,
        student_steps=args.student_steps,
        teacher_steps=args.teacher_steps,
        heldout=args.heldout,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        grad_clip=args.grad_clip,
    )
    return args.out, options, _narrow_options(parser, args), args.force, args


def _narrow_options(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> NarrowOptions | None:
    """The narrow student's options from ``args`` (None without ``--narrow``), checked."""
    given = args.narrow_hidden is not None or args.narrow_steps is not None
    if not args.narrow:
        if given:
            parser.error("--narrow-hidden and --narrow-steps need --narrow")
        return None
    defaults = NarrowOptions()
    hidden = defaults.hidden if args.narrow_hidden is None else args.narrow_hidden
    steps = defaults.steps if args.narrow_steps is None else args.narrow_steps
    if hidden < 1 or hidden % (2 * NUM_HEADS):
        parser.error(f"--narrow-hidden must be a positive multiple of {2 * NUM_HEADS}")
    if steps < 1:
        parser.error("--narrow-steps must be positive")
    return NarrowOptions(hidden=hidden, steps=steps)


def main(argv: Sequence[str] | None = None) -> int:
    """Build the toy task (and with ``--narrow`` the narrow student) unless ``--out`` already
    holds it; return the exit status."""
    out, options, narrow, force, args = parse_args(argv)
    if args.chat_task is not None:
        build_chat_task(out, args.chat_task, options.seed, args.heldout, args.train_prompts)
        print(f"{out / 'data'}: {args.heldout} held-out and {args.train_prompts} training prompts")
        return 0
    if not force and is_complete(out, options):
        scores = (read_manifest(out) or {}).get("accuracy", {})
        print(f"{out}: already complete with these options ({scores}); --force rebuilds")
    else:
        scores = build(out, options)
        print(f"greedy accuracy on held-out: student {scores['student']:.1%}, ", end="")
        print(f"teacher {scores['teacher']:.1%}  ({out / 'models' / 'accuracy.json'})")
    if args.second_task:
        second = SecondOptions(
            steps=SecondOptions.steps if args.second_steps is None else args.second_steps
        )
        if not force and is_second_complete(out, options, second):
            two = (read_second_manifest(out) or {}).get("accuracy", {})
            print(f"{out}: second task already complete ({two}); --force rebuilds")
        else:
            two = build_second(out, options, second)
        for name, by_task in two.items():
            cells = ", ".join(f"{task} {acc:.1%}" for task, acc in by_task.items())
            print(f"greedy accuracy on held-out: {name}: {cells}")
    if narrow is None:
        return 0
    if not force and is_narrow_complete(out, options, narrow):
        scores = (read_narrow_manifest(out) or {}).get("accuracy", {})
        print(f"{out}: narrow student already complete ({scores}); --force rebuilds")
        return 0
    score = build_narrow(out, options, narrow)
    print(f"greedy accuracy on held-out: {NARROW_NAME} (hidden {narrow.hidden}, ", end="")
    print(f"{narrow.steps} steps) {score:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
