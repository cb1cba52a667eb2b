"""tools/prepare_eval.py: AIME and MATH layouts (JSONL and Parquet) into prompt files that the
evaluation reads and the verifiers score."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from oprd_mega.data.prompts import load_prompts, read_rows
from oprd_mega.train.eval_data import DEFAULT_TEMPLATE, main
from oprd_mega.train.evaluation import check_answers
from oprd_mega.train.verifiers import make_verifier
from tools.tiny_hf import make_tokenizer

REPO = Path(__file__).resolve().parents[2]

# As in HuggingFaceH4/aime_2024 (answers are strings there; an int here as some copies have).
AIME = [
    {"id": 60, "problem": "Find $m+n$.", "solution": "... so $\\boxed{204}$", "answer": "204",
     "url": "https://example.org/1", "year": "2024"},
    {"id": 61, "problem": "How many?", "solution": "It is 33.", "answer": 33,
     "url": "https://example.org/2", "year": "2024"},
]  # fmt: skip
# As in hendrycks MATH: the answer only in the solution's last \boxed{}, nested braces.
MATH = [
    {"problem": "Compute $\\sin 60^\\circ$.", "level": "Level 2", "type": "Precalculus",
     "solution": "First $\\boxed{1}$ is wrong; $\\sin 60^\\circ = \\boxed{\\frac{\\sqrt{3}}{2}}$."},
    {"problem": "Solve $x^2=4$, $x>0$.", "level": "Level 1", "type": "Algebra",
     "solution": "$x = \\boxed{2}$"},
]  # fmt: skip


def _jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_aime_jsonl_and_math_parquet(tmp_path: Path) -> None:
    aime = _jsonl(tmp_path / "aime.jsonl", AIME)
    math = tmp_path / "math.parquet"
    pq.write_table(pa.Table.from_pylist(MATH), math)
    out = tmp_path / "eval" / "competition.jsonl"
    assert main([str(aime), str(math), "-o", str(out)]) == 0
    rows = read_rows(out)
    assert [r["answer"] for r in rows] == ["204", "33", "\\frac{\\sqrt{3}}{2}", "2"]
    assert rows[0]["prompt"] == (
        "Find $m+n$.\n\nPlease reason step by step, and put your final answer within \\boxed{}."
    )
    assert rows[2]["prompt"].startswith("Compute $\\sin 60^\\circ$.\n\n")
    assert (rows[0]["id"], rows[0]["year"], rows[0]["source_row"]) == (60, "2024", 0)
    assert (rows[3]["level"], rows[3]["type"], rows[3]["source"]) == (
        "Level 1",
        "Algebra",
        str(math),
    )
    assert all("solution" not in r for r in rows)
    # What the evaluation reads: every row has its answer, which the verifiers accept boxed.
    prompts = load_prompts(out, make_tokenizer(), chat_template=False)
    check_answers(prompts, "answer", str(out))
    assert [p.extra["answer"] for p in prompts] == [r["answer"] for r in rows]
    boxed = make_verifier("boxed")
    assert all(boxed(f"... \\boxed{{{r['answer']}}}", r["answer"]) for r in rows)
    pytest.importorskip("math_verify")
    verify = make_verifier("math-verify")
    assert verify("so $\\boxed{\\frac{\\sqrt3}{2}}$", rows[2]["answer"])
    assert not verify("so $\\boxed{\\frac{1}{2}}$", rows[2]["answer"])


def test_template_keys_and_limit(tmp_path: Path) -> None:
    rows = [{"Question": f"q{i}", "Answer": i, "Solution": "x"} for i in range(5)]
    source = _jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    argv = [str(source), "-o", str(out), "--problem-key", "Question", "--limit", "3",
            "--template", "Q: {problem}\nA:"]  # fmt: skip
    assert main(argv) == 0
    written = read_rows(out)
    assert [(r["prompt"], r["answer"]) for r in written] == [
        ("Q: q0\nA:", "0"), ("Q: q1\nA:", "1"), ("Q: q2\nA:", "2"),
    ]  # fmt: skip


def test_nothing_overwritten_without_force(tmp_path: Path) -> None:
    source = _jsonl(tmp_path / "aime.jsonl", AIME)
    out = tmp_path / "out.jsonl"
    out.write_text("keep\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"out.jsonl exists; pass --force"):
        main([str(source), "-o", str(out)])
    assert out.read_text(encoding="utf-8") == "keep\n"
    assert main([str(source), "-o", str(out), "--force"]) == 0
    assert len(read_rows(out)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aime.jsonl", "out.jsonl"]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"question_text": "x", "answer": "1"}], r"bad.jsonl row 0: no problem column"),
        ([{"problem": "x", "answer": "1"}, {"problem": "y", "solution": "no box"}],
         r"bad.jsonl row 1: no answer"),
        ([{"problem": "x", "answer": "  "}], r"bad.jsonl row 0: no answer"),
        ([{"problem": "", "answer": "1"}], r"bad.jsonl row 0: column 'problem' is not"),
    ],
)  # fmt: skip
def test_bad_rows_name_file_and_row(
    tmp_path: Path, rows: list[dict[str, object]], message: str
) -> None:
    source = _jsonl(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit, match=message):
        main([str(source), "-o", str(out)])
    assert not out.exists()


def test_bad_files_and_template(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(SystemExit, match="empty.jsonl has no rows"):
        main([str(empty), "-o", str(tmp_path / "o.jsonl")])
    with pytest.raises(SystemExit, match=r"nowhere.jsonl does not exist"):
        main([str(tmp_path / "nowhere.jsonl"), "-o", str(tmp_path / "o.jsonl")])
    source = _jsonl(tmp_path / "aime.jsonl", AIME)
    with pytest.raises(SystemExit, match=r"must contain \{problem\}"):
        main([str(source), "-o", str(tmp_path / "o.jsonl"), "--template", "no field"])
    assert "{problem}" in DEFAULT_TEMPLATE


def test_tool_script_runs(tmp_path: Path) -> None:
    source = _jsonl(tmp_path / "aime.jsonl", AIME)
    out = tmp_path / "out.jsonl"
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "prepare_eval.py"), str(source), "-o", str(out)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote 2 prompts to {out}"
