"""Evaluation sets: resolution from the config, loading with answer checks, scoring under each
set's name, and the trainer logging several named sets in one run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from oprd_mega.config import ConfigError
from oprd_mega.data.prompts import Prompt, PromptDataError
from oprd_mega.rollout.samples import Sample
from oprd_mega.train.evaluation import (
    EvalSet,
    describe_eval,
    evaluation_sets,
    load_eval_set,
    main,
    score,
)
from oprd_mega.train.metrics import read_metrics
from tests.config.helpers import minimal
from tests.torchrun_utils import free_port
from tests.train.runs import make_task, require_success, task_config, train
from tools.tiny_hf import make_tiny_model_dir


class CharTokenizer:
    """Characters as token ids: enough for raw prompts and decoding answers."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(char) for char in text]

    def decode(self, ids: tuple[int, ...], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


def _write(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_sets_resolve_from_the_config() -> None:
    config = minimal(
        "evaluation.interval=5",
        "evaluation.prompts=main.jsonl",
        "evaluation.k=2",
        "rollout.sampling.temperature=0.7",
        "evaluation.sets.aime.prompts=aime.jsonl",
        "evaluation.sets.aime.k=8",
        "evaluation.sets.aime.verifier=math-verify",
        "evaluation.sets.math.prompts=math.jsonl",
        "evaluation.sets.math.answer_key=solution_answer",
        "evaluation.sets.math.sampling.temperature=0.0",
    )
    main_set, aime, math = evaluation_sets(config)
    assert (main_set.name, main_set.prefix, main_set.key) == ("", "eval/", "evaluation")
    assert (main_set.k, main_set.sampling.n, main_set.sampling.temperature) == (2, 2, 0.7)
    assert (aime.prefix, aime.key, aime.verifier, aime.k) == (
        "eval/aime/",
        "evaluation.sets.aime",
        "math-verify",
        8,
    )
    # No sampling of its own: the run's rollout sampling with n = the set's k.
    assert (aime.sampling.n, aime.sampling.temperature) == (8, 0.7)
    assert (math.answer_key, math.sampling.temperature, math.sampling.n) == (
        "solution_answer",
        0.0,
        16,
    )
    # Only named sets, and evaluation off.
    only_named = minimal("evaluation.interval=5", "evaluation.sets.aime.prompts=a.jsonl")
    assert [s.name for s in evaluation_sets(only_named)] == ["aime"]
    off = minimal("evaluation.prompts=main.jsonl", "evaluation.sets.aime.prompts=a.jsonl")
    assert evaluation_sets(off) == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["evaluation.sets.aime.promts=a.jsonl"],
         "evaluation.sets.aime.promts = \"a.jsonl\": unknown key; did you mean "
         "'evaluation.sets.aime.prompts'?"),
        (["evaluation.sets.aime.k=4"], "evaluation.sets.aime.prompts = null: a named evaluation"),
        (["evaluation.sets.a b.prompts=x"], "evaluation.sets.a b = \"a b\": a set name is"),
        (["evaluation.interval=3"], "needs a prompt file (or evaluation.sets)"),
        (["evaluation.sets.aime.prompts=x", "evaluation.sets.aime.k=0"],
         "evaluation.sets.aime.k = 0: "),
    ],
)  # fmt: skip
def test_bad_sets_are_named(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        minimal(*overrides)
    assert message in str(error.value)


def test_missing_answer_column_names_the_set_and_file(tmp_path: Path) -> None:
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "result": "4"}]
    path = _write(tmp_path / "aime.jsonl", rows)
    config = minimal("evaluation.interval=1", f"evaluation.sets.aime.prompts={path}")
    (eval_set,) = evaluation_sets(config)
    with pytest.raises(PromptDataError) as error:
        load_eval_set(eval_set, CharTokenizer(), chat_template=False)
    message = str(error.value)
    assert "evaluation.sets.aime.prompts" in message and str(path) in message
    assert "row 1" in message and "'answer'" in message and "result" in message
    bad_prompt = _write(tmp_path / "bad.jsonl", [{"question": "x", "answer": "1"}])
    config = minimal("evaluation.interval=1", f"evaluation.prompts={bad_prompt}")
    with pytest.raises(PromptDataError, match=r"evaluation.prompts = .*bad.jsonl.*'prompt'"):
        load_eval_set(evaluation_sets(config)[0], CharTokenizer(), chat_template=False)


def test_max_prompts_keeps_the_first(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.jsonl", [{"prompt": f"{i}=", "answer": str(i)} for i in range(5)])
    config = minimal(
        "evaluation.interval=1", f"evaluation.prompts={path}", "evaluation.max_prompts=3"
    )
    prompts = load_eval_set(evaluation_sets(config)[0], CharTokenizer(), chat_template=False)
    assert [p.extra["answer"] for p in prompts] == ["0", "1", "2"]


def _sample(text: str, group: int, index: int, finish: str = "stop") -> Sample:
    ids = tuple(ord(c) for c in text)
    return Sample((1,), ids, (0.0,) * len(ids), finish, None, group, index)


def test_score_under_a_set_prefix() -> None:
    prompts = [Prompt(0, (1,), {"answer": "4"}), Prompt(1, (1,), {"answer": "7"})]
    texts = [["4", "5", "4", "x"], ["1", "2", "3", "7"]]
    groups = [[_sample(t, g, i) for i, t in enumerate(row)] for g, row in enumerate(texts)]
    metrics = score(prompts, groups, CharTokenizer(), "answer", "exact", prefix="eval/aime/")
    # By hand: prompt 0 has 2 of 4 right, prompt 1 has 1 of 4.
    # pass@2 = 1 - C(n-c, 2)/C(4, 2): prompt 0 1 - 1/6, prompt 1 1 - 3/6.
    assert metrics == pytest.approx(
        {
            "eval/aime/avg_at_k": (2 / 4 + 1 / 4) / 2,
            "eval/aime/best_at_k": 1.0,
            "eval/aime/pass_at_1": (2 / 4 + 1 / 4) / 2,
            "eval/aime/pass_at_2": ((1 - 1 / 6) + (1 - 3 / 6)) / 2,
            "eval/aime/pass_at_4": 1.0,
            "eval/aime/response_length": 1.0,
            "eval/aime/truncated_fraction": 0.0,
            "eval/aime/k": 4.0,
            "eval/aime/num_prompts": 2.0,
        }
    )
    config = minimal(
        "evaluation.interval=1", "evaluation.sets.aime.prompts=a", "rollout.sampling.n=4"
    )
    eval_set = EvalSet("aime", "a", "answer", "exact", 4, None, config.rollout.sampling)
    assert describe_eval(eval_set, metrics) == (
        "aime Avg@4 37.5%, Best@4 100.0%, pass@2 66.7% (2 prompts, mean response length 1.0)"
    )


def test_evaluate_names_a_file_without_answers(tmp_path: Path) -> None:
    model = make_tiny_model_dir(tmp_path / "model")
    path = _write(tmp_path / "held.jsonl", [{"prompt": "a b", "solution": "1"}])
    with pytest.raises(SystemExit, match=r"held.jsonl.*no answer column 'answer'"):
        main(["--model", str(model), "--prompts", str(path)])


def test_trainer_logs_each_named_set(tmp_path: Path) -> None:
    task = make_task(tmp_path / "task")
    heldout = str(task / "heldout.jsonl")
    config = task_config(tmp_path / "task", tmp_path / "run", parallel={"tp": 1, "pp": 1})
    sampling = "{temperature: 1.0, max_new_tokens: 3, sampling_seed: 5}"
    result = train(
        config,
        "schedule.steps=1",
        "evaluation.interval=1",
        # The same prompts, k and sampling as the top-level set: the same numbers, logged twice.
        f"evaluation.sets.again.prompts={heldout}",
        "evaluation.sets.again.k=2",
        "evaluation.sets.again.verifier=exact",
        f"evaluation.sets.again.sampling={sampling}",
        f"evaluation.sets.wide.prompts={heldout}",
        "evaluation.sets.wide.k=4",
        "evaluation.sets.wide.max_prompts=2",
        nproc=1,
        timeout=240,
    )
    out = require_success(result)
    records = read_metrics(tmp_path / "run" / "logs", kind="eval")
    assert [r["step"] for r in records] == [0, 1]
    for record in records:
        ours = {k.removeprefix("eval/"): v for k, v in record.items() if k.startswith("eval/")}
        top = {k: v for k, v in ours.items() if "/" not in k}
        again = {k.removeprefix("again/"): v for k, v in ours.items() if k.startswith("again/")}
        assert top == again and "best_at_k" in top and "pass_at_2" in top
        assert (record["eval/wide/k"], record["eval/wide/num_prompts"]) == (4, 2)
        assert {"eval/wide/pass_at_1", "eval/wide/pass_at_2", "eval/wide/pass_at_4"} <= set(record)
    assert "step 1: again Avg@2" in out and "step 1: wide Avg@4" in out
    assert "step 0: held-out Avg@2" in out
    # Events through logging (timestamp, level) and one line per step.
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO \[oprd-mega\] "
    step_line = re.search(stamp + r"step 1/1 \| loss (\S+) \| grad norm \S+ \| lr .* \| "
                          r"time rollout \S+ s, teacher \S+ s, student \S+ s, sync \S+ s \| "
                          r"response length \S+ \| skipped 0\n", out)  # fmt: skip
    assert step_line is not None, out
    train_record = read_metrics(tmp_path / "run" / "logs", kind="train")[0]
    assert float(step_line.group(1)) == pytest.approx(train_record["loss"], rel=1e-3)
    assert re.search(stamp + "step 1: again Avg@2", out)
    assert "[oprd-mega] done: 1 steps" in out


def test_evaluate_prints_json_and_logs_apart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = make_tiny_model_dir(tmp_path / "model")
    rows = [{"prompt": f"the quick {i}", "answer": str(i)} for i in range(3)]
    path = _write(tmp_path / "held.jsonl", rows)
    argv = ["--model", str(model), "--prompts", str(path), "--k", "2", "--temperature", "1.0",
            "--max-new-tokens", "2", "--verifier", "exact", "--port", str(free_port()),
            "--json"]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    metrics = json.loads(captured.out)  # standard output holds only the result
    assert metrics["eval/k"] == 2 and metrics["eval/num_prompts"] == 3
    assert {"eval/avg_at_k", "eval/best_at_k", "eval/pass_at_1", "eval/pass_at_2"} <= set(metrics)
    assert metrics["eval/pass_at_1"] == pytest.approx(metrics["eval/avg_at_k"])
    assert "INFO [oprd-mega] evaluating" in captured.err


def test_evaluate_on_a_taken_port_is_one_line_naming_the_flag(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    model = make_tiny_model_dir(tmp_path / "model")
    path = _write(tmp_path / "held.jsonl", [{"prompt": "a b", "answer": "1"}])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "oprd_mega.cli", "evaluate", "--model", str(model),
             "--prompts", str(path), "--port", str(port), "--log-level", "WARNING"],
            capture_output=True, text=True, timeout=240,
        )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"oprd-mega evaluate: error: --port: port {port} on 127.0.0.1 ")
    assert "is taken by pid" in lines[0] and "base_port" not in lines[0]
