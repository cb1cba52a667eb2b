"""Stage 1 end to end (``tools/build_bridge.py``) against a float64 transformers reference, plus
the pure row plan, token spans and the input checks.

The end-to-end runs use a tiny student (hidden 32, 2 layers) and teacher (hidden 48, 4 layers):
one at TP1 (data parallel 2) sampling its rollouts from the embedded server, one at PP2 with a
teacher of another (character-level) tokenizer and a row subsample. The reference runs both
models in transformers (float64) on the token sequences of ``samples.jsonl`` (same tokenizer) or
of the canonical tokenizations it wrote itself, pairing tokens by the student tokenizer's own
offsets (cross-tokenizer), and states the method directly: the teacher rows' mean and
covariance, its eigenvectors, and P_S judged on the fit's own held-out rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from oprd_mega.bridge import (
    ModelIdentity,
    check_bridge_models,
    load_bridge_file,
    mean_cosine,
    select_rows,
)
from oprd_mega.bridge.build import BuildError, main, parse_layers, resolve_ranks
from oprd_mega.bridge.plan import (
    PairedSequence,
    batch_tensors,
    data_parallel_share,
    microbatches,
    plan_work,
    same_tokenizer_sequence,
    supervised_positions,
)
from oprd_mega.bridge.rollouts import SamplesFileError, read_samples
from oprd_mega.bridge.student_map import split_rows
from oprd_mega.bridge.tokens import cross_tokenizer_sequence, token_spans
from oprd_mega.distill.batch import make_microbatch
from oprd_mega.distill.positions import PositionSpec
from oprd_mega.models.hf_config import load_hf_config
from tests.torchrun_utils import free_port, run_torchrun
from tools.tiny_hf import make_tiny_model_dir, make_tokenizer

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "build_bridge.py"
PAIRS = [(1, 1), (2, 4)]  # phi for a 2-layer student and a 4-layer teacher
HELDOUT, SEED = 0.1, 0


# ----------------------------------------------------------------------------- the row plan


@pytest.mark.parametrize(
    "spec",
    [PositionSpec("all"), PositionSpec("last_k", 3), PositionSpec("first_k", 2, "prediction")],
)
def test_supervised_positions_are_the_steps(spec: PositionSpec) -> None:
    for prompt, response in [(4, 6), (2, 1), (3, 0)]:
        ids = list(range(1, prompt + response + 1))
        mask = make_microbatch(0, [ids], [prompt], prompt + response + 2, spec).supervised[0]
        assert supervised_positions(prompt, response, spec) == mask.nonzero().squeeze(1).tolist()


def _sequences(lengths: list[tuple[int, int]]) -> list[PairedSequence]:
    return [
        same_tokenizer_sequence(range(1, p + 1), range(100, 100 + r), PositionSpec("all"))
        for p, r in lengths
    ]


def test_row_plan_does_not_depend_on_the_data_parallel_split() -> None:
    generator = torch.Generator().manual_seed(3)
    lengths = [(int(p), int(r)) for p, r in torch.randint(1, 9, (11, 2), generator=generator)]
    sequences = _sequences(lengths)
    counts = [s.rows for s in sequences]
    selected = select_rows(sum(counts), 17, seed=5)

    def rows_of(dp: int) -> list[tuple[tuple[int, ...], int]]:
        out = []
        for rank in range(dp):
            share, first = data_parallel_share(counts, dp, rank)
            assert first == sum(counts[: share.start])
            for item in plan_work(sequences, selected, share, first):
                out += [(item.sequence.student_ids, p) for p in item.positions("student")]
        return out

    one = rows_of(1)
    assert len(one) == 17
    assert rows_of(2) == one and rows_of(3) == one and rows_of(11) == one


def test_microbatches_keep_the_budget_and_index_the_selected_rows() -> None:
    sequences = _sequences([(3, 5), (2, 2), (4, 6), (1, 1)])
    counts = [s.rows for s in sequences]
    items = plan_work(sequences, torch.arange(sum(counts)), range(4), 0)
    batches = microbatches(items, max_tokens=16)
    assert [len(b) for b in batches] == [2, 1, 1]  # 2 x 8 tokens; 10 alone; then 2
    tokens, positions, columns = batch_tensors(batches[0], "student")
    assert tokens.shape == (2, 8) and tokens[1, 4:].tolist() == [0] * 4
    assert positions.tolist() == [3, 4, 5, 6, 7, 2, 3] and columns.tolist() == [0] * 5 + [1] * 2
    trimmed = plan_work(sequences, torch.tensor([1]), range(1), 0)  # row 1 = position 4
    assert trimmed[0].needed_ids("teacher") == sequences[0].teacher_ids[:5]
    with pytest.raises(ValueError, match="positions 0..9 outside its 3 tokens"):
        PairedSequence((1, 2, 3), (0, 9), (1, 2, 3), (0, 1))


def test_rank_and_layer_flags() -> None:
    assert resolve_ranks(None, 48) == [1, 2, 4, 8, 16, 32, 48]
    assert resolve_ranks(None, 6) == [1, 2, 4, 6]
    assert resolve_ranks("4,0,4", 48) == [4, 48]
    with pytest.raises(BuildError, match="--ranks: 64 is larger than the teacher's hidden size"):
        resolve_ranks("64", 48)
    with pytest.raises(BuildError, match="--ranks 'x'"):
        resolve_ranks("x", 48)
    assert parse_layers("odd") == "odd" and parse_layers("1,3") == [1, 3]
    with pytest.raises(BuildError, match="--layers 'first'"):
        parse_layers("first")


def test_samples_file_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    path.write_text('{"prompt_ids": [1, 2], "response_ids": [3]}\n{"prompt_ids": [1]}\n')
    with pytest.raises(SamplesFileError, match=r"samples.jsonl:2: 'response_ids' must be a list"):
        read_samples(path)
    with pytest.raises(SamplesFileError, match="--samples: file not found"):
        read_samples(tmp_path / "missing.jsonl")


# ----------------------------------------------------------------------------- end to end

RESPONSES = [
    " the quick brown fox jumps over the lazy dog",
    " a student samples responses and a teacher reads them",
    " numbers 0 1 2 3 4 5 6 7 8 9 and punctuation , . ! ?",
    " on-policy representation distillation aligns hidden states",
]


def char_tokenizer():  # type: ignore[no-untyped-def]
    """One token per printable ASCII character (offsets: one character each)."""
    import string

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {token: i for i, token in enumerate([*specials, *string.printable[:95]])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def make_char_teacher(path: Path, seed: int = 2, layers: int = 4, hidden: int = 48) -> Path:
    """A tiny random Llama with :func:`char_tokenizer`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, eos_token_id=1, pad_token_id=0, bos_token_id=None,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_token_spans_follow_incremental_decoding() -> None:
    tok = make_tokenizer()
    text = "the fox \u00e9 jumps!"
    ids = [*tok.encode(text, add_special_tokens=False), tok.eos_token_id]
    decoded, spans = token_spans(tok, ids)
    assert decoded == text and spans[-1] == (len(text), len(text))  # EOS decodes to nothing
    assert "".join(text[a:b] for a, b in spans) == text
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True).offset_mapping
    empty = [i for i, (a, b) in enumerate(spans[:-1]) if a == b]
    assert empty and all(text[spans[i + 1][0] : spans[i + 1][1]].endswith("\u00e9") for i in empty)
    assert all(b == offsets[i][1] for i, (a, b) in enumerate(spans[:-1]) if a < b)


def test_cross_tokenizer_sequence_pairs_last_characters() -> None:
    student, teacher = make_tokenizer(), char_tokenizer()
    response = [*student.encode(" the quick fox", add_special_tokens=False), student.eos_token_id]
    sequence, skipped = cross_tokenizer_sequence(
        [7, 8], response, [5, 6, 7], student, teacher, PositionSpec("all")
    )
    assert skipped == 1  # the EOS token covers no character
    _, spans = token_spans(student, response)
    assert sequence.student_positions == tuple(range(2, 2 + len(response) - 1))
    assert sequence.teacher_positions == tuple(3 + end - 1 for _, end in spans[:-1])
    assert len(sequence.teacher_ids) == 3 + len(" the quick fox")
    with pytest.raises(ValueError, match="positions.anchor: 'prediction' is not supported"):
        cross_tokenizer_sequence(
            [7], response, [5], student, teacher, PositionSpec("all", 1, "prediction")
        )


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bridge-task")
    make_tiny_model_dir(root / "student", seed=0, layers=2, hidden=32)
    make_tiny_model_dir(root / "teacher", seed=1, layers=4, hidden=48)
    make_char_teacher(root / "char_teacher")
    with (root / "prompts.jsonl").open("w") as handle:
        for i in range(8):
            handle.write(json.dumps({"prompt": f"numbers {i} and the quick fox"}) + "\n")
    return root


def _args(task: Path, out: Path, *extra: str, teacher: str = "teacher") -> list[str]:
    return [
        "--student", str(task / "student"), "--teacher", str(task / teacher),
        "--out", str(out), "--ranks", "1,2,4,0", "--seed", str(SEED), "--no-progress", *extra,
    ]  # fmt: skip


def test_bad_inputs_are_named(task: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    prompts = ["--prompts", str(task / "prompts.jsonl")]
    cases = [
        (["--teacher", str(tmp_path / "nope")], "--teacher: model directory not found"),
        (["--ranks", "64"], "--ranks: 64 is larger than the teacher's hidden size d_T = 48"),
        (["--tp", "3"], "--tp 3: must divide the student's num_attention_heads"),
        (["--pp", "2", "--layers", "1"], "--pp 2: the student runs 1 layer"),
        (["--layers", "3"], "--layers 3: layers: 3 is outside 1..2"),
        (["--prompts", str(tmp_path / "p.jsonl")], "--prompts: file not found"),
    ]
    for extra, message in cases:
        assert main([*_args(task, tmp_path / "out"), *prompts, *extra]) == 2
        assert message in capsys.readouterr().err


Rows = list[tuple[list[int], list[int]]]  # (token ids, supervised positions) per sequence


def _reference_states(model_dir: Path, sequences: Rows) -> dict[int, torch.Tensor]:
    """Layer -> [rows, hidden] float64: each layer's output at the given positions, in order."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float64, attn_implementation="eager"
    ).eval()
    captured: dict[int, list[torch.Tensor]] = {}
    current: list[int] = []

    def hook_for(layer: int):  # type: ignore[no-untyped-def]
        def hook(_module, _inputs, output) -> None:  # type: ignore[no-untyped-def]
            hidden = output[0] if isinstance(output, tuple) else output
            captured.setdefault(layer, []).append(hidden.reshape(-1, hidden.shape[-1])[current])

        return hook

    for number, block in enumerate(model.model.layers, start=1):
        block.register_forward_hook(hook_for(number))
    with torch.no_grad():
        for ids, positions in sequences:
            current[:] = positions
            model(torch.tensor([ids]))
    return {layer: torch.cat(rows) for layer, rows in captured.items()}


def _check_run(
    task: Path, out: Path, reference: dict, max_rows: int | None, teacher_dir: str = "teacher"
) -> None:
    report = json.loads((out / "report.json").read_text())
    total = reference["teacher"][1].shape[0]
    chosen = select_rows(total, max_rows or total, SEED)
    assert report["supervised_rows"] == total and report["rows"] == chosen.numel()
    assert report["files"] == {str(r): f"bridge-r{r}.safetensors" for r in (1, 2, 4, 48)}
    assert {(f["student_layer"], f["teacher_layer"], f["rank"]) for f in report["fits"]} == {
        (s, t, r) for s, t in PAIRS for r in (1, 2, 4, 48)
    }
    assert all("cosine_before" in f and "cosine_after" in f for f in report["fits"])
    student = ModelIdentity.from_args(load_hf_config(task / "student"), "s")
    teacher = ModelIdentity.from_args(load_hf_config(task / teacher_dir), "t")
    for rank in (1, 2, 4, 48):
        bridge = load_bridge_file(out / f"bridge-r{rank}.safetensors")
        check_bridge_models(bridge, student, teacher, pairs=PAIRS, rank=rank)
        assert bridge.metadata.rows == chosen.numel() and bridge.metadata.normalize
        assert bridge.metadata.alignment == report["alignment"]
        for s, t in PAIRS:
            h_t, h_s = reference["teacher"][t][chosen], reference["student"][s][chosen]
            p_t, mu_t = (x.double() for x in bridge.teacher[t])
            torch.testing.assert_close(mu_t, h_t.mean(0), rtol=1e-4, atol=1e-4)
            values, vectors = torch.linalg.eigh(torch.cov(h_t.t(), correction=0))
            values, vectors = values.flip(0), vectors.flip(1).t()
            gaps = (values[:-1] - values[1:]) / values[0]
            separated = [
                i
                for i in range(rank)
                if (i == 0 or gaps[i - 1] > 1e-3) and (i + 1 == values.numel() or gaps[i] > 1e-3)
            ]
            assert len(separated) >= min(rank, 4) - 1, (rank, gaps[:rank])
            for i in separated:
                assert abs(float(p_t[i] @ vectors[i])) > 0.999, (rank, t, i)
            # P_S on the fit's own held-out rows, from reference states: the reported cosine.
            _, held = split_rows(chosen.numel(), HELDOUT, SEED)
            p_s = bridge.student[s].weight().double()
            cosine = mean_cosine(h_s[held] @ p_s.t(), (h_t[held] - mu_t) @ p_t.t())
            fit = next(f for f in report["fits"] if f["student_layer"] == s and f["rank"] == rank)
            assert cosine == pytest.approx(fit["cosine_after"], abs=1e-3)


def _same_tokenizer_reference(task: Path, samples: list[dict]) -> dict:
    rows = []
    for sample in samples:
        prompt, response = sample["prompt_ids"], sample["response_ids"]
        rows.append((prompt + response, list(range(len(prompt), len(prompt) + len(response)))))
    return {
        "student": _reference_states(task / "student", rows),
        "teacher": _reference_states(task / "teacher", rows),
    }


def _cross_tokenizer_samples(task: Path, path: Path) -> tuple[Rows, Rows]:
    """Canonical student tokenizations of RESPONSES (so the student's own offsets are the truth)
    written as a samples file, and both models' (ids, positions): every student response token
    pairs with the teacher's token of its last character (one teacher token per character)."""
    from transformers import AutoTokenizer

    student_tok = AutoTokenizer.from_pretrained(task / "student")
    teacher_tok = AutoTokenizer.from_pretrained(task / "char_teacher")
    prompts = [json.loads(line)["prompt"] for line in (task / "prompts.jsonl").open()]
    student_rows, teacher_rows = [], []
    with path.open("w") as handle:
        for i in range(2 * len(prompts)):
            prompt, text = prompts[i % len(prompts)], RESPONSES[(i + i // len(prompts)) % 4]
            encoded = student_tok(text, add_special_tokens=False, return_offsets_mapping=True)
            s_prompt = student_tok.encode(prompt)
            t_prompt = teacher_tok.encode(prompt)
            row = {
                "prompt_index": i % len(prompts),
                "prompt_ids": s_prompt,
                "response_ids": encoded.input_ids,
            }
            handle.write(json.dumps(row) + "\n")
            response = range(len(s_prompt), len(s_prompt) + len(encoded.input_ids))
            student_rows.append((s_prompt + encoded.input_ids, list(response)))
            t_ids = t_prompt + teacher_tok.encode(text, add_special_tokens=False)
            assert len(t_ids) == len(t_prompt) + len(text)
            ends = [len(t_prompt) + end - 1 for _, end in encoded.offset_mapping]
            teacher_rows.append((t_ids, ends))
    return student_rows, teacher_rows


def test_build_bridge_matches_a_float64_reference(task: Path, tmp_path: Path) -> None:
    """TP1 (data parallel 2) with rollouts from the embedded server, same tokenizer; then PP2
    with a teacher of another tokenizer and a row subsample."""
    first = tmp_path / "tp1"
    run_torchrun(
        TOOL,
        *_args(task, first, "--prompts", str(task / "prompts.jsonl")),
        "--backend", "embedded", "--port", str(free_port()), "--samples-per-prompt", "2",
        "--max-new-tokens", "12",
        nproc=2, timeout=240, cwd=ROOT,
    )  # fmt: skip
    samples = [json.loads(line) for line in (first / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 16 and all(s["response_ids"] for s in samples)
    _check_run(task, first, _same_tokenizer_reference(task, samples), None)

    second = tmp_path / "pp2-cross"
    student_rows, teacher_rows = _cross_tokenizer_samples(task, tmp_path / "cross.jsonl")
    extra = ["--samples", str(tmp_path / "cross.jsonl"), "--prompts", str(task / "prompts.jsonl")]
    run_torchrun(
        TOOL, *_args(task, second, *extra, "--pp", "2", "--max-rows", "100",
                     teacher="char_teacher"),
        nproc=2, timeout=240, cwd=ROOT,
    )  # fmt: skip
    report = json.loads((second / "report.json").read_text())
    assert report["alignment"] == "last_character" and report["skipped_tokens"] == 0
    reference = {
        "student": _reference_states(task / "student", student_rows),
        "teacher": _reference_states(task / "char_teacher", teacher_rows),
    }
    _check_run(task, second, reference, 100, "char_teacher")


def _write_samples(path: Path, count: int = 8, seed: int = 0) -> Path:
    """Rollouts without a server: random prompt and response ids of the tiny vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    with path.open("w") as handle:
        for i in range(count):
            ids = torch.randint(5, 300, (14,), generator=generator).tolist()
            row = {"prompt_index": i, "prompt_ids": ids[:6], "response_ids": ids[6:]}
            handle.write(json.dumps(row) + "\n")
    return path


@pytest.mark.slow
def test_tensor_parallel_build_matches_the_reference(task: Path, tmp_path: Path) -> None:
    samples = _write_samples(tmp_path / "samples.jsonl")
    out = tmp_path / "tp2"
    run_torchrun(
        TOOL, *_args(task, out, "--samples", str(samples), "--tp", "2"),
        nproc=2, timeout=240, cwd=ROOT,
    )  # fmt: skip
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    _check_run(task, out, _same_tokenizer_reference(task, rows), None)


@pytest.mark.slow
def test_training_runs_with_a_built_bridge(task: Path, tmp_path: Path) -> None:
    from oprd_mega.train.metrics import read_metrics
    from tests.train.runs import require_success, task_config, train

    bridge = tmp_path / "bridge"
    samples = _write_samples(tmp_path / "samples.jsonl")
    run_torchrun(TOOL, *_args(task, bridge, "--samples", str(samples)), nproc=1, cwd=ROOT)
    distillation = {
        "method": "oprd",
        "layers": "all",
        "positions": {"mode": "all"},
        "normalize": True,
        "projection": {"mode": "bridge", "bridge_path": str(bridge / "bridge-r4.safetensors")},
    }
    config = task_config(
        task,
        tmp_path / "run",
        parallel={"tp": 1, "pp": 1},
        data={"path": str(task / "prompts.jsonl"), "chat_template": False},
        distillation=distillation,
        schedule={"steps": 2, "warmup_steps": 1},
        evaluation={},
    )
    require_success(train(config, nproc=2, timeout=300))
    records = read_metrics(tmp_path / "run" / "logs", "train")
    assert len(records) == 2
    for record in records:
        assert record["rep/loss/layer_1"] is not None and record["rep/loss/layer_2"] is not None
        assert 0 < record["rep/loss"] < 4  # normalized MSE of unit vectors: in [0, 4]


@pytest.mark.slow
def test_an_error_on_rank0_stops_every_rank(task: Path, tmp_path: Path) -> None:
    prompts = ["--prompts", str(task / "prompts.jsonl"), "--prompt-key", "question"]
    with pytest.raises(AssertionError) as failure:
        run_torchrun(TOOL, *_args(task, tmp_path / "out", *prompts), nproc=2, timeout=120, cwd=ROOT)
    message = str(failure.value)
    assert "timed out" not in message and "exited" in message
    assert "oprd-mega bridge: error: --prompts / --prompt-key" in message
    assert "no column 'question'" in message
