"""Several teachers: the teachers list, its routes, and every bad input named by its key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from oprd_mega.config import ConfigError, data_parallel_size
from oprd_mega.config.model_files import check_launch
from oprd_mega.data.routing import PromptRouter, check_routes
from tests.config.helpers import minimal
from tools.tiny_hf import make_tiny_model_dir

TWO = "teachers=[{name: math, path: a}, {name: code, path: b}]"


def _problems(*overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        minimal("teacher=null", *overrides)
    return info.value.problems


def test_the_single_teacher_is_a_list_of_one_with_the_shared_keys() -> None:
    config = minimal("distillation.layers=[1]", "parallel.teacher.tp=1")
    (entry,) = config.teacher_list
    assert (entry.name, entry.model.path, entry.layers, entry.weight) == (
        "teacher",
        "models/teacher",
        (1,),
        1.0,
    )
    assert entry.key("path") == "teacher.path"
    assert entry.key("layers") == "distillation.layers"
    assert entry.key("parallel.tp") == "parallel.teacher.tp"
    assert entry.key("projection.mode") == "distillation.projection.mode"


def test_entries_inherit_the_shared_keys_unless_they_set_their_own() -> None:
    config = minimal(
        "teacher=null",
        "distillation.layers=[1, 2]",
        "distillation.projection.mode=full",
        "teachers=[{name: math, path: a}, {name: code, path: b, layers: last, weight: 0.5, "
        "projection: {mode: identity}, parallel: {tp: 2}}]",
    )
    math, code = config.teacher_list
    assert (math.layers, math.projection.mode, math.layout.tp, math.weight) == (
        (1, 2),
        "full",
        None,
        1.0,
    )
    assert (code.layers, code.projection.mode, code.layout.tp, code.weight) == (
        "last",
        "identity",
        2,
        0.5,
    )
    assert math.key("layers") == "distillation.layers"
    assert code.key("layers") == "teachers[1].layers"
    assert code.key("parallel.tp") == "teachers[1].parallel.tp"
    assert math.key("parallel.tp") == "parallel.teacher.tp"
    assert code.key("path") == "teachers[1].path"


def test_bad_teacher_lists_name_the_dotted_key() -> None:
    assert _problems("teachers=[{name: a, path: x}, {name: a, path: y}]") == [
        'teachers[1].name = "a": duplicate teacher name (teachers[0] has it)'
    ]
    assert _problems("teachers=[{name: 'a b', path: x}]")[0].startswith("teachers[0].name")
    assert _problems(TWO, "routing.default=[math, physics]") == [
        'routing.default[1] = "physics": names no teacher (teachers: math, code)'
    ]
    routes = _problems(TWO, "data.teacher_field=domain", "routing.routes={algebra: algebra}")
    assert routes == [
        'routing.routes.algebra[0] = "algebra": names no teacher (teachers: math, code)'
    ]
    assert _problems(TWO, "routing.routes={m: math}")[0].startswith(
        'routing.routes = ["m"]: routes map values of data.teacher_field'
    )
    with pytest.raises(ConfigError) as info:
        minimal(TWO)  # the teacher section as well
    assert info.value.problems[0].startswith("teachers = ")
    assert _problems()[0].startswith("teacher = null: a run needs a teacher section")


def test_two_teachers_cannot_claim_one_bridge_file() -> None:
    shared = "{mode: bridge, bridge_path: b.safetensors}"
    problems = _problems(
        "distillation.normalize=true",
        f"teachers=[{{name: a, path: x, projection: {shared}}}, "
        f"{{name: b, path: y, projection: {shared}}}]",
    )
    assert len(problems) == 1
    assert problems[0].startswith('teachers[1].projection.bridge_path = "b.safetensors": also ')
    assert "built for one (student, teacher) pair" in problems[0]
    inherited = _problems(
        "distillation.normalize=true",
        "distillation.projection.mode=bridge",
        "distillation.projection.bridge_path=b.safetensors",
        TWO,
    )
    assert inherited[0].startswith("teachers[1].projection.bridge_path")
    assert "through distillation.projection.bridge_path" in inherited[0]


def test_a_teacher_layout_that_does_not_divide_the_world_names_its_key() -> None:
    config = minimal(
        "teacher=null", "teachers=[{name: a, path: x}, {name: b, path: y, parallel: {tp: 3}}]"
    )
    with pytest.raises(ConfigError) as info:
        data_parallel_size(config, 4)
    assert info.value.problems[0].startswith(
        "teachers[1].parallel.tp = 3, parallel.teacher.pp = 1: tp * pp = 3 must divide the "
        "world size 4"
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    make_tiny_model_dir(root / "student", seed=0, layers=2, hidden=64)
    make_tiny_model_dir(root / "wide", seed=1, layers=3, hidden=96)
    make_tiny_model_dir(root / "same", seed=2, layers=4, hidden=64)
    (root / "p.jsonl").write_text('{"prompt": "x"}\n')
    return root


def _two(
    root: Path,
    *overrides: str,
    projection: str = ", projection: {mode: full}",
    layers: str = "[2]",
    same: Path | None = None,
):
    return minimal(
        f"student.path={root / 'student'}",
        f"data.path={root / 'p.jsonl'}",
        "teacher=null",
        f"teachers=[{{name: wide, path: {root / 'wide'}{projection}}}, "
        f"{{name: same, path: {same or root / 'same'}, layers: {layers}}}]",
        *overrides,
    )


def test_every_teacher_is_checked_against_its_own_model(models: Path) -> None:
    wide, same = check_launch(_two(models), 2)
    assert [s for s, _ in wide] == [1, 2] and wide[-1][1] == 3
    assert same == [(2, 4)]
    with pytest.raises(ConfigError) as info:  # the shared identity projection for a wider one
        check_launch(_two(models, projection=""), 2)
    assert info.value.problems == [
        "distillation.projection.mode = 'identity': the student's width 64 differs from "
        "teacher 'wide''s 96; use 'full' or 'bridge'"
    ]
    with pytest.raises(ConfigError) as info:
        check_launch(_two(models, layers="[5]"), 2)
    assert info.value.problems[0].startswith("teachers[1].layers = [5]: ")


def test_a_teacher_with_another_tokenizer_is_refused_naming_both(
    models: Path, tmp_path: Path
) -> None:
    other = tmp_path / "same"
    shutil.copytree(models / "same", other)
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[10:12]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other / "tokenizer.json").write_text(json.dumps(data))
    config = _two(models, "distillation.method=opd-top1", same=other)
    with pytest.raises(ConfigError) as info:
        check_launch(config, 2)
    (problem,) = info.value.problems
    assert problem.startswith(
        f"student.path = {str(models / 'student')!r} and teachers[1].path = {str(other)!r} do "
        "not share a tokenizer: token id 10"
    )
    assert "in the teacher 'same'" in problem


def test_every_prompt_route_is_checked_before_launch(tmp_path: Path) -> None:
    rows = [{"prompt": "a", "task": "add"}, {"prompt": "b"}, {"prompt": "c", "task": ""}]
    rows += [{"prompt": "d", "task": ["add", "sub"]}, {"prompt": "e", "task": "mul"}]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    teachers = "teachers=[{name: add, path: a}, {name: sub, path: b}]"
    config = minimal("teacher=null", teachers, f"data.path={data}", "data.teacher_field=task")
    with pytest.raises(ConfigError) as info:
        check_routes(config)
    assert info.value.problems == [
        f"data.path = {str(data)!r} row 4: data.teacher_field 'task' = 'mul' names no route "
        "(teachers: add, sub)"
    ]
    router = PromptRouter.of(config)
    assert [router.route_of(row.get("task"), "row") for row in rows[:4]] == [
        ("add",),
        ("add", "sub"),  # no value: routing.default, null: every teacher
        ("add", "sub"),
        ("add", "sub"),
    ]
    mapped = minimal(
        "teacher=null",
        teachers,
        f"data.path={data}",
        "data.teacher_field=task",
        "routing.routes={add: add, sub: sub, mul: [add, sub]}",
        "routing.default=[]",
    )
    check_routes(mapped)
    router = PromptRouter.of(mapped)
    assert router.route_of(None, "row") == ()  # supervised by none
    assert router.route_of("mul", "row") == ("add", "sub")
    # one teacher: nothing is routed, whatever the column holds
    single = minimal(f"data.path={data}")
    assert PromptRouter.of(single).route_of("anything", "row") is None
