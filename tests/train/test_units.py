"""The trainer's pure pieces against hand-computed expectations."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from oprd_mega.data.microbatches import StepSample, plan_step, rank_microbatches
from oprd_mega.distill.batch import make_packed_microbatch
from oprd_mega.distill.positions import PositionSpec
from oprd_mega.train.lr_schedule import learning_rate
from oprd_mega.train.prompt_stream import PromptStream
from tools.quickstart_summary import gap_closed, summary_line


def lr(step: int, decay: str = "cosine") -> float:
    return learning_rate(step, lr=1.0, min_lr=0.1, steps=11, warmup=2, decay=decay)  # type: ignore[arg-type]


def test_learning_rate_warmup_then_decay() -> None:
    assert [lr(0), lr(1)] == [0.5, 1.0]
    assert lr(10) == pytest.approx(0.1) and lr(10, "linear") == pytest.approx(0.1)
    # Halfway through the decay (step 6 of 2..10): cosine and linear both at the midpoint.
    assert lr(6) == pytest.approx(0.55) and lr(6, "linear") == pytest.approx(0.55)
    assert lr(4) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lr(7, "constant") == 1.0
    with pytest.raises(ValueError, match="outside"):
        lr(11)


def test_prompt_stream_epochs_and_resume() -> None:
    items = list(range(7))
    stream = PromptStream(items, seed=3)
    first = stream.take(5) + stream.take(5)  # crosses into epoch 1
    assert sorted(first[:7]) == items and stream.epoch == 1
    state = stream.state_dict()
    after = stream.take(6)
    again = PromptStream(items, seed=3)
    again.load_state_dict(state)
    assert again.take(6) == after
    assert PromptStream(items, seed=4).take(7) != PromptStream(items, seed=3).take(7)
    assert PromptStream(items, seed=3, shuffle=False).take(9) == [*items, 0, 1]
    with pytest.raises(ValueError, match="data.path"):
        PromptStream(list(range(6)), seed=3).load_state_dict(state)


def test_rank_microbatches_cover_every_sample_once() -> None:
    samples = [StepSample(tuple(range(1, 3 + n)), 2) for n in (1, 5, 2, 7, 3, 4)]
    schedule = plan_step(samples, dp_size=2, max_tokens=14, multiple=1, cost=None)
    seen = []
    shapes = set()
    for rank in range(2):
        for batch in rank_microbatches(samples, schedule, rank, PositionSpec("all"), 0, 4):
            shapes.add(batch.shape)
            for row in range(batch.shape[0]):
                length = int((batch.tokens[row] != 0).sum())
                seen.append(length)
                assert int(batch.supervised[row].sum()) == max(length - 2, 0)
    assert sorted(x for x in seen if x > 1) == sorted(len(s.token_ids) for s in samples)
    assert len(shapes) == 1 and next(iter(shapes))[1] % 4 == 0  # one shape, seq padded to 4


@pytest.mark.parametrize(
    "positions", [PositionSpec("all"), PositionSpec("last_k", 2, "prediction")]
)
def test_packed_microbatches_hold_the_padded_rows_back_to_back(positions: PositionSpec) -> None:
    samples = [StepSample(tuple(range(1, 3 + n)), 2) for n in (1, 5, 2, 7, 3, 4)]
    schedule = plan_step(samples, dp_size=2, max_tokens=14, multiple=1, cost=None)
    shapes, seen = set(), []
    for rank in range(2):
        packed = rank_microbatches(samples, schedule, rank, positions, 0, 4, packed=True)
        padded = rank_microbatches(samples, schedule, rank, positions, 0, 4)
        for one, rows in zip(packed, padded, strict=True):
            shapes.add(one.shape)
            cu = one.cu_seqlens.tolist()
            assert one.shape[0] == 1 and cu[0] == 0 and cu[-1] == one.shape[1]
            for j, index in enumerate(schedule.ranks[rank][one.index]):
                start, stop = cu[j], cu[j + 1]
                assert stop - start == len(samples[index].token_ids)
                seen.append(index)
                for field in ("tokens", "supervised", "predicts", "labels"):
                    got = getattr(one, field)[0, start:stop]
                    assert torch.equal(got, getattr(rows, field)[j, : stop - start]), field
            tail = slice(cu[len(schedule.ranks[rank][one.index])], None)
            assert not one.supervised[0, tail].any() and not one.predicts[0, tail].any()
    assert sorted(seen) == list(range(len(samples)))
    assert len(shapes) == 1 and next(iter(shapes))[1] % 4 == 0


def test_packed_microbatch_refuses_overflow() -> None:
    with pytest.raises(ValueError, match="more than seq_length 5"):
        make_packed_microbatch(0, [[1, 2, 3], [4, 5, 6]], [1, 1], 5, PositionSpec("all"))


def test_summary_line_format() -> None:
    line = summary_line(0.95, [(0, 0.12), (300, 0.9)], [(0, 0.12), (300, 0.2)], 3e-4)
    assert line == (
        "quickstart: teacher 95.0%, student before 12.0% -> after 90.0% (gap closed 94.0%); "
        "opd-top1 (lr 3e-4) after 20.0%"
    )
    assert gap_closed(1.0, 0.5, 0.75) == 0.5
    with pytest.raises(SystemExit, match="no gap"):
        gap_closed(0.5, 0.6, 0.7)


def test_quickstart_script_prints_the_checked_line_last() -> None:
    script = (Path(__file__).resolve().parents[2] / "scripts" / "quickstart.sh").read_text()
    assert script.rstrip().splitlines()[-2].strip().startswith('"$py" tools/quickstart_summary.py')


def test_train_command_names_config_errors(capsys: pytest.CaptureFixture[str]) -> None:
    from oprd_mega.cli import main

    example = Path(__file__).resolve().parents[2] / "examples" / "tiny_cpu.yaml"
    assert main(["train", "--config", str(example), "distillation.methd=oprd"]) == 2
    err = capsys.readouterr().err
    assert "distillation.methd" in err and "did you mean 'distillation.method'" in err
    assert main(["train", "--config", str(example), "--resume", "always", "seed=-1"]) == 2
    assert "seed" in capsys.readouterr().err


def test_transformer_engine_request_fails_before_servers_on_cpu() -> None:
    from oprd_mega.config import ConfigError
    from oprd_mega.train.trainer import _transformer_impls
    from tests.config.helpers import minimal

    assert _transformer_impls(minimal()) == {"student": False, "teacher": False}
    with pytest.raises(ConfigError, match=r"teacher\.transformer_impl='transformer_engine'"):
        _transformer_impls(minimal("teacher.transformer_impl=transformer_engine"))
    with pytest.raises(ConfigError, match=r"student\.transformer_impl"):
        minimal("student.transformer_impl=te")


def test_busy_clock_counts_only_time_with_no_request_in_flight() -> None:
    from oprd_mega.train.rollouts import BusyClock

    now = [0.0]
    clock = BusyClock(clock=lambda: now[0])
    now[0] = 2.0
    clock.begin()  # idle 0..2
    now[0] = 3.0
    clock.begin()  # two in flight
    now[0] = 5.0
    clock.end()
    now[0] = 6.0
    clock.end()  # idle again from 6
    now[0] = 6.5
    assert clock.idle_seconds() == 2.5
