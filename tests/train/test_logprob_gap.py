"""tools/logprob_gap.py: answer log-probs against generate's own scores, and the gap."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tools import logprob_gap
from tools.tiny_hf import make_tiny_model_dir


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gap")
    teacher = make_tiny_model_dir(root / "teacher", seed=1)
    return teacher, make_tiny_model_dir(root / "other", seed=2)


PROMPTS = [[5, 9, 13, 7], [20, 3], [11, 12, 14, 15, 16, 17]]


def test_answer_logprobs_equal_the_scores_of_generate(models: tuple[Path, Path]) -> None:
    model = logprob_gap.load(models[0])
    eos = model.config.eos_token_id
    answers = logprob_gap.greedy_answers(model, PROMPTS, max_new_tokens=5, eos=eos)
    scores = logprob_gap.answer_logprobs(model, PROMPTS, answers)
    for prompt, answer, score in zip(PROMPTS, answers, scores, strict=True):
        # the reference: generate's own per-step scores (incremental, with its KV cache)
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=5, do_sample=False, eos_token_id=eos,
            pad_token_id=eos, output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
        assert out.sequences[0, len(prompt) :].tolist() == answer
        assert 1 <= len(answer) <= 5
        reference = model.compute_transition_scores(
            out.sequences, out.scores, normalize_logits=True
        )[0]
        torch.testing.assert_close(score, reference.double(), atol=1e-5, rtol=0)
        assert bool((score <= 0).all())


def test_gap_is_zero_for_the_teacher_and_positive_for_another_model(
    models: tuple[Path, Path], tmp_path: Path
) -> None:
    teacher, other = models
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi there"}]}) + "\n")
    out = tmp_path / "gap.json"
    status = logprob_gap.main(
        ["--teacher", str(teacher), "--prompts", str(prompts), "--max-new-tokens", "4",
         "--json", str(out), f"self={teacher}", f"other={other}"]
    )  # fmt: skip
    assert status == 0
    result = json.loads(out.read_text())
    assert result["prompts"] == 1 and 1 <= result["answer_tokens"] <= 4
    assert result["gap"]["self"] == pytest.approx(0.0, abs=1e-9)
    assert result["gap"]["other"] > 0.1  # the teacher's greedy answer is unlikely under another


def test_models_must_be_named_directories(models: tuple[Path, Path]) -> None:
    with pytest.raises(SystemExit):
        logprob_gap.parse_args(["--teacher", "t", "--prompts", "p", str(models[1])])
    with pytest.raises(SystemExit):
        logprob_gap.parse_args(["--teacher", "t", "--prompts", "p", "x=/nonexistent/dir"])
